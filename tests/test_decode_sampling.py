"""The fast decoder's token draw: the distribution it samples from, exactly.

A grid of evenly spaced uniforms fed to an inverse-CDF draw hits each token in proportion
to its probability (to within one grid step), so these checks are deterministic.
"""

from __future__ import annotations

import pytest
import torch

from engine.backends.local import decode
from engine.backends.local.decode import SamplingSpec, draw

VOCAB = 3000  # not a multiple of the CDF block: the padded path
GRID = 4000


def _reference(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """The distribution as a plain full sort computes it (temperature, top_k, then top_p)."""
    scaled = logits / spec.temperature
    if spec.top_k:
        kth = torch.topk(scaled, spec.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if 0 < spec.top_p < 1:
        values, order = torch.sort(probs, descending=True, dim=-1)
        drop = values.cumsum(-1) - values > spec.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, values.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, VOCAB, generator=g, dtype=torch.float64)
    # A peaked row (nucleus of a few tokens), a medium one (hundreds), a flat one (thousands).
    return (base * torch.tensor([[8.0], [2.5], [0.3]], dtype=torch.float64)).float()


def _counts(logits: torch.Tensor, spec: SamplingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    u = (torch.arange(GRID, dtype=torch.float32) + 0.5) / GRID
    counts = torch.zeros(logits.shape[0], VOCAB)
    picked_ok = True
    for r in range(logits.shape[0]):
        row = logits[r : r + 1].expand(GRID, -1)
        chosen, picked = draw(row, u, spec)
        counts[r] = torch.bincount(chosen, minlength=VOCAB).float() / GRID
        expected = torch.log_softmax(logits[r], -1)[chosen]
        picked_ok &= bool(torch.allclose(picked, expected, atol=1e-5))
    return counts, torch.tensor(picked_ok)


@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec(1.0),
        SamplingSpec(0.7),
        SamplingSpec(1.0, top_p=0.95),
        SamplingSpec(0.8, top_p=0.9, top_k=500),
        SamplingSpec(1.0, top_k=50),
    ],
)
def test_draw_samples_the_reference_distribution(spec):
    logits = _rows()
    want = _reference(logits.double(), spec).float()
    got, picked_ok = _counts(logits, spec)
    assert bool(picked_ok)  # the logprob is the untempered, unrestricted one
    assert ((got > 0) & (want == 0)).sum() == 0  # never a token outside the kept set
    # Each token's share within one grid step (and float rounding) of its probability.
    assert (got - want).abs().max() <= 2.0 / GRID + 1e-4
    if spec.top_p < 1 and not spec.top_k:  # the rows exercise each nucleus size
        sizes = (want > 0).sum(-1).tolist()
        assert sizes[0] < 64 < sizes[1] < 1024 < sizes[2]


@pytest.mark.parametrize("max_tries", [1, decode.NUCLEUS_MAX_TRIES])
def test_top_p_rejection_draws_follow_the_nucleus(monkeypatch, max_tries):
    """Rows draw from the whole row and redraw outside the nucleus (a peaked row, whose
    nucleus is a few tokens, and two flatter ones); the accepted tokens must follow the
    renormalized nucleus."""
    monkeypatch.setattr(decode, "NUCLEUS_MAX_TRIES", max_tries)
    vocab, draws, chunk = 400, 60_000, 6_000
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, vocab, generator=g) * torch.tensor([[6.0], [1.5], [0.4]])).float()
    spec = SamplingSpec(1.0, top_p=0.9)
    want = _reference(logits.double(), spec).float()
    sizes = (want > 0).sum(-1).tolist()
    assert sizes[0] < 10 < sizes[1] < sizes[2] < vocab
    redraws = 0

    def more(rows):
        nonlocal redraws
        redraws += len(rows)
        return torch.rand(len(rows), generator=g)

    for r in range(3):
        counts = torch.zeros(vocab)
        for _ in range(draws // chunk):
            u = torch.rand(chunk, generator=g)
            chosen, _ = draw(logits[r : r + 1].expand(chunk, -1), u, spec, more)
            counts += torch.bincount(chosen, minlength=vocab).float()
        got = counts / draws
        assert ((got > 0) & (want[r] == 0)).sum() == 0
        assert 0.5 * (got - want[r]).abs().sum() < 0.03  # total variation; chance level ~0.01
    assert redraws > 0  # the rejection path really ran


def test_greedy_takes_the_most_likely_token():
    logits = _rows()
    chosen, picked = draw(logits, None, SamplingSpec(0.0))
    assert chosen.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(picked, torch.log_softmax(logits, -1).max(-1).values)
