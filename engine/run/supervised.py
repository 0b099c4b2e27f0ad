"""The supervised step shared by sft, reward-model and DITTO's SFT initialisation: seeded
batches, one cross-entropy step, and its per-token mean NLL."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import tinker
from tinker_cookbook.supervised.common import compute_mean_nll

from engine.run.futures import resolve


def mean_nll(result: Any, batch: Sequence[tinker.Datum]) -> float:
    """Per-token mean NLL of a forward(_backward) result (losses come back as sums):
    -sum(logprob * weight) / sum(weight) over the batch."""
    weights = [d.loss_fn_inputs["weights"] for d in batch]
    outs = getattr(result, "loss_fn_outputs", None)
    if outs:
        if not sum(float(w.to_torch().sum()) for w in weights):
            return float("nan")
        return compute_mean_nll([o["logprobs"] for o in outs], weights)
    total_w = sum(float(w.to_torch().sum()) for w in weights)
    loss_sum = float(getattr(result, "metrics", {}).get("loss:sum", float("nan")))
    return loss_sum / total_w if total_w else float("nan")


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Rows of batch ``step``: epochs of seeded shuffles laid end to end (same on resume)."""
    start = step * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, k = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(order[k])
    return out


async def supervised_step(tc: Any, batch: list[tinker.Datum], adam: tinker.AdamParams) -> float:
    """One cross-entropy step (forward_backward and optim_step submitted before either is
    awaited: one round trip on Tinker); returns the batch's per-token mean NLL."""
    fb = tc.forward_backward(batch, "cross_entropy")
    opt = tc.optim_step(adam)
    result = await resolve(fb)
    await resolve(opt)
    return mean_nll(result, batch)
