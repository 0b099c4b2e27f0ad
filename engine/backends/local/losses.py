"""Tinker's built-in losses, as sums over tokens (never means), one datum at a time.

Input position t predicts ``target_tokens[t]``; ``logp`` is that token's log-probability.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SUPPORTED_LOSSES = ("cross_entropy", "importance_sampling", "ppo")

# Which loss_fn_inputs each loss needs besides target_tokens.
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
}


def datum_loss(
    loss_fn: str,
    logp: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str] | None = None,
) -> torch.Tensor:
    if loss_fn == "cross_entropy":
        return -(logp * inputs["weights"]).sum()
    ratio = torch.exp(logp - inputs["logprobs"])
    advantages = inputs["advantages"]
    if loss_fn == "importance_sampling":
        return -(ratio * advantages).sum()
    if loss_fn == "ppo":
        config = config or {}
        low = float(config.get("clip_low_threshold", 0.8))
        high = float(config.get("clip_high_threshold", 1.2))
        clipped = torch.clamp(ratio, low, high)
        return -torch.minimum(ratio * advantages, clipped * advantages).sum()
    raise ValueError(
        f"Unsupported loss_fn {loss_fn!r}: the local backend supports {', '.join(SUPPORTED_LOSSES)} "
        f"and forward_backward_custom."
    )


def gradient_positions(loss_fn: str, inputs: Mapping[str, torch.Tensor]) -> list[bool]:
    """Which positions' logprobs the loss can send a gradient to: those whose weight
    (cross_entropy) or advantage (the policy-gradient losses) is not 0."""
    key = "weights" if loss_fn == "cross_entropy" else "advantages"
    return (inputs[key] != 0).tolist()
