"""Likelihood of the person's own text under a model: mean negative log-likelihood per token.

The target is scored exactly as SFT trains on it: the conversation plus the target as the
assistant message, rendered by the model's cookbook renderer with
``build_supervised_example``; the tokens with non-zero weight (the assistant message,
including its end-of-turn token) are the ones averaged. ``compute_logprobs`` returns one
entry per token, entry ``i`` being log p(token_i | tokens before it), and ``None`` first.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Nll:
    """Summed NLL over ``tokens`` weighted tokens; ``mean`` is per token (nan when empty)."""

    total: float
    tokens: float

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else float("nan")

    def __add__(self, other: Nll) -> Nll:
        return Nll(self.total + other.total, self.tokens + other.tokens)


def sequence_nll(logprobs: Sequence[float | None], weights: Sequence[float] | None = None) -> Nll:
    """Weighted NLL of one sequence: Σ -logprob_i·w_i over Σ w_i.

    Without weights every position with a logprob counts once. A weighted position whose
    logprob is None (the first token has no prediction) is an error: it cannot be scored.
    """
    if weights is None:
        weights = [0.0 if lp is None else 1.0 for lp in logprobs]
    if len(weights) != len(logprobs):
        raise ValueError(f"{len(logprobs)} logprobs but {len(weights)} weights")
    total = count = 0.0
    for i, (lp, w) in enumerate(zip(logprobs, weights, strict=True)):
        w = float(w)
        if w == 0.0:
            continue
        if lp is None:
            raise ValueError(f"position {i} has weight {w} but no logprob")
        total -= float(lp) * w
        count += w
    return Nll(total, count)


def mean_nll(
    logprobs_lists: Sequence[Sequence[float | None]],
    weights_lists: Sequence[Sequence[float] | None] | None = None,
) -> float:
    """Mean NLL per token pooled over several sequences (token-weighted, not per sequence)."""
    if weights_lists is None:
        weights_lists = [None] * len(logprobs_lists)
    total = Nll(0.0, 0.0)
    for lps, ws in zip(logprobs_lists, weights_lists, strict=True):
        total = total + sequence_nll(lps, ws)
    return total.mean


def supervised_input(
    renderer: Any, conversation: Sequence[Mapping[str, Any]], target_text: str
) -> tuple[Any, list[float]]:
    """The rendered (ModelInput, per-token weights) of ``conversation`` + the target as the
    last assistant message; weights are 1 on the target's tokens."""
    messages = [dict(m) for m in conversation] + [{"role": "assistant", "content": target_text}]
    model_input, weights = renderer.build_supervised_example(messages)
    return model_input, [float(w) for w in weights.tolist()]


async def _resolve(x: Any) -> Any:
    while inspect.isawaitable(x):
        x = await x
    return x


async def target_nll(
    client: Any, renderer: Any, conversation: Sequence[Mapping[str, Any]], target_text: str
) -> Nll:
    """NLL of ``target_text`` as the assistant's answer to ``conversation`` under ``client``
    (a sampling client with ``compute_logprobs``). ``.mean`` is the per-token NLL."""
    model_input, weights = supervised_input(renderer, conversation, target_text)
    logprobs = await _resolve(client.compute_logprobs(model_input))
    return sequence_nll(list(logprobs), weights)


async def target_nlls(
    client: Any,
    renderer: Any,
    items: Sequence[tuple[Sequence[Mapping[str, Any]], str]],
) -> list[Nll]:
    """:func:`target_nll` for many ``(conversation, target_text)`` items, all requests sent
    before any is awaited (the local service batches them; Tinker pipelines them)."""
    futures = []
    weights_list = []
    for conversation, target in items:
        model_input, weights = supervised_input(renderer, conversation, target)
        futures.append(client.compute_logprobs(model_input))
        weights_list.append(weights)
    results = await asyncio.gather(*(_resolve(f) for f in futures))
    return [sequence_nll(list(lps), ws) for lps, ws in zip(results, weights_list, strict=True)]
