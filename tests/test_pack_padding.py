"""Packed rows are padded to a multiple of PACK_MULTIPLE positions (so oneDNN sees few
distinct shapes): the padding is a segment of its own, and no row's numbers move."""

from __future__ import annotations

import pytest
import torch

from engine.backends.local import compute

ROWS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [2, 71, 82, 81, 82, 84, 59], [5, 9, 26, 53]]


@pytest.fixture(scope="module")
def rt():
    from conftest import adapted_runtime

    rt = adapted_runtime()
    if not rt.packing:
        pytest.skip("this model's attention cannot be told where packed rows start")
    return rt


def _run(rt, rows):
    seen: list[int] = []
    hook = rt.model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape[0])
    )
    try:
        for p in rt.host.parameters("a"):
            p.grad = None
        logps = rt.token_logprobs("a", [r[:-1] for r in rows], [r[1:] for r in rows], grad=True)
        sum(lp.sum() for lp in logps).backward()
    finally:
        hook.remove()
    grads = [p.grad.clone() for p in rt.host.parameters("a")]
    return [lp.detach() for lp in logps], grads, seen


@pytest.mark.parametrize("rows", [ROWS, ROWS[:1]], ids=["three rows", "one row"])
def test_padding_to_a_multiple_leaves_every_rows_numbers(rt, monkeypatch, rows):
    padded = _run(rt, rows)
    assert padded[2] == [compute.PACK_MULTIPLE]  # 18 or 9 positions, padded to 64
    monkeypatch.setattr(compute, "PACK_MULTIPLE", 0)
    exact = _run(rt, rows)
    assert exact[2] == [sum(len(r) - 1 for r in rows)]
    for a, b in zip(padded[0], exact[0], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(padded[1], exact[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rows_of_one_length_that_fill_a_multiple_keep_their_batch(rt, monkeypatch):
    monkeypatch.setattr(compute, "PACK_MULTIPLE", 8)
    rows = [list(range(3, 12)), list(range(20, 29))]  # 2 x 8 positions: a multiple of 8
    assert _run(rt, rows)[2] == [16]
    calls: list[dict] = []
    decoder = rt.model.get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True
    )
    try:
        _run(rt, rows)
    finally:
        hook.remove()
    assert "attention_mask" in calls[0] and "position_ids" not in calls[0]  # the padded batch
