"""Rotary position embedding for training as one autograd node per tensor.

``transformers``' ``apply_rotary_pos_emb`` is ``x * cos + rotate_half(x) * sin``, where
``rotate_half`` slices, negates and concatenates: five full passes over q and over k
forward and about as many backward, every layer. Moving the negation into the table
(``signed_sin = cat(-sin1, sin2)``) turns ``rotate_half(x) * sin`` into
``roll(x) * signed_sin``: the same products (a negation is exact), so the same numbers bit
for bit, in four passes; the backward is its transpose, ``g * cos + roll(g * signed_sin)``,
the same sums autograd forms through the model's expression.
"""

from __future__ import annotations

import torch
from torch import nn

from . import lora
from .routing import route_forward

# False: the model's own rotary function runs, installed or not (bench A/B).
FUSED_ROTARY = True


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, bit for bit, with ``signed = signed_sin(sin)``."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, signed):  # noqa: ANN001, ANN205
        ctx.save_for_backward(cos, signed)
        return rotate(x, cos, signed)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        cos, signed = ctx.saved_tensors
        # The roll by half the head is its own inverse, so it is its own transpose.
        return grad * cos + (grad * signed).roll(grad.shape[-1] // 2, -1), None, None


class _SignedSinCache:
    """The last sin table and its signed form: every layer of one forward shares a table."""

    def __init__(self) -> None:
        self.sin: torch.Tensor | None = None
        self.signed: torch.Tensor | None = None

    def get(self, sin: torch.Tensor) -> torch.Tensor:
        if self.sin is not sin or self.signed is None:
            self.sin, self.signed = sin, signed_sin(sin)
        return self.signed


def apply(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: _SignedSinCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` for (batch, heads, seq, head_dim) tensors and
    (batch, seq, head_dim) tables."""
    cos = cos.unsqueeze(1)
    signed = (cache.get(sin) if cache is not None else signed_sin(sin)).unsqueeze(1)
    if torch.is_grad_enabled() and not (cos.requires_grad or signed.requires_grad):
        return _RotaryFn.apply(q, cos, signed), _RotaryFn.apply(k, cos, signed)
    return rotate(q, cos, signed), rotate(k, cos, signed)


def _attention_forward(module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    """LlamaAttention.forward with its rotary step replaced and q, k and v projected as one
    LoRA node (``lora.shared_input``); anything it does not expect (a key/value cache, other
    arguments) goes to the model's own forward."""
    position_embeddings = kwargs.get("position_embeddings")
    if args or position_embeddings is None or kwargs.get("past_key_values") is not None:
        return type(module).forward(module, hidden_states, *args, **kwargs)
    from transformers.models.llama.modeling_llama import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    kwargs = dict(kwargs)
    kwargs.pop("position_embeddings")
    kwargs.pop("past_key_values", None)
    attention_mask = kwargs.pop("attention_mask", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    q, k, v = (
        t.view(hidden_shape).transpose(1, 2)
        for t in lora.shared_input(hidden_states, (module.q_proj, module.k_proj, module.v_proj))
    )
    cos, sin = position_embeddings
    if FUSED_ROTARY:
        q, k = apply(q, k, cos, sin, module._persona_signed_sin)
    else:
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    out, weights = attend(
        module,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return module.o_proj(out), weights


def install(model: nn.Module) -> int:
    """Route every LlamaAttention of ``model`` through the fused rotary; the number routed."""
    return route_forward(
        model,
        "LlamaAttention",
        "head_dim",
        _attention_forward,
        _persona_signed_sin=_SignedSinCache(),  # one table for every layer of the model
    )
