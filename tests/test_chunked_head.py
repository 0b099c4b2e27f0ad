"""The output layer + log-softmax computed a block of positions at a time.

``_HeadTargetLogprob`` never holds the (positions x vocab) logits; these tests hold it to the
plain computation (full logits, ``log_softmax``, autograd): the same logprobs and the same
LoRA gradients, for every loss the service runs, in fp32 and bf16, on the tiny model.
"""

from __future__ import annotations

import pytest
import torch

from engine.backends.local import TINY_MODEL, compute
from engine.backends.local.compute import BaseRuntime
from engine.backends.local.lora import ATTN_MODULES, MLP_MODULES, UNEMBED_MODULES, LoraSpec
from engine.backends.local.losses import datum_loss
from engine.backends.local.models import choose_compute

SEQ_A = [1, 4093, 198, 19556, 665, 2, 198, 1, 520, 9531, 17, 1073]
SEQ_B = [1, 520, 9531, 198, 26843, 17, 1073]
SEQ_C = [1, 198, 665, 2, 5]


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32: equal to rounding, element by element. bf16: two bf16 computations may round
    differently (a packed row's attention, another matmul blocking), so the error is taken
    over the whole tensor, relative to its norm (bf16 keeps 8 bits: 2^-8 = 0.4%)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=what)
        return
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
    assert err < 3e-2, f"{what}: relative error {err:.2e}"


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def rt(request) -> BaseRuntime:
    runtime = BaseRuntime(TINY_MODEL, choose_compute("cpu", request.param))
    spec = LoraSpec(4, 8.0, ATTN_MODULES + MLP_MODULES + UNEMBED_MODULES)
    runtime.host.add("a", spec, torch.Generator().manual_seed(0))
    runtime.host.add("attn-only", LoraSpec(4, 8.0, ATTN_MODULES), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B starts at 0: move it, so the adapter changes every layer's output
        for name in ("a", "attn-only"):
            for p in runtime.host.parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return runtime


@pytest.fixture
def small_blocks(monkeypatch):
    """The chunked head, in blocks of 3 positions, so every batch here spans several blocks
    and a partial one."""
    monkeypatch.setattr(compute, "CHUNKED_HEAD", True)
    monkeypatch.setattr(compute, "HEAD_CHUNK_ROWS", 3)


def _inputs(rows):
    return [r[:-1] for r in rows], [r[1:] for r in rows]


def _plain_logprobs(rt: BaseRuntime, adapter, rows) -> list[torch.Tensor]:
    """Full logits from the model's own forward (its LoRA-wrapped head), float32 log_softmax."""
    rt.host.switch.active = adapter
    out = []
    for row in rows:
        logits = rt.model(input_ids=torch.tensor([row[:-1]]), use_cache=False).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        out.append(logp.gather(-1, torch.tensor(row[1:])[:, None])[:, 0])
    return out


def _grads(rt: BaseRuntime, adapter: str, run) -> tuple[list[torch.Tensor], list]:
    """The logprobs ``run()`` returns (after its backward pass) and the adapter's gradients."""
    params = rt.host.parameters(adapter)
    for p in params:
        p.grad = None
    logps = run()
    return [lp.detach() for lp in logps], [p.grad.clone() for p in params]


def _loss_fns(rows):
    """(name, loss over per-row logprobs): the built-in losses, with zero weights and
    advantages on some positions, and a DPO-style custom loss over two rows."""
    g = torch.Generator().manual_seed(5)
    n = [len(r) - 1 for r in rows]
    weights = [torch.tensor([0.0] * (k - 3) + [1.0, 0.5, 1.0]) for k in n]
    adv = [torch.tensor([1.0, -2.0] * k)[:k] * (torch.rand(k, generator=g) > 0.3) for k in n]
    q = [torch.randn(k, generator=g) * 0.3 - 9.0 for k in n]

    def builtin(name):
        def loss(logps):
            return sum(
                datum_loss(name, lp, {"weights": w, "logprobs": qq, "advantages": a})
                for lp, w, qq, a in zip(logps, weights, q, adv, strict=True)
            )

        return loss

    def dpo(logps):
        chosen = (logps[0] * weights[0]).sum() - (logps[1] * weights[1]).sum()
        return -torch.nn.functional.logsigmoid(0.05 * chosen)

    return [
        ("cross_entropy", builtin("cross_entropy")),
        ("importance_sampling", builtin("importance_sampling")),
        ("ppo", builtin("ppo")),
        ("dpo", dpo),
    ]


@pytest.mark.parametrize("adapter", ["a", "attn-only"])
@pytest.mark.parametrize("packed", [True, False])
def test_logprobs_and_lora_gradients_match_the_plain_computation(
    rt, small_blocks, monkeypatch, adapter, packed
):
    """Every loss: the chunked head's logprobs and LoRA gradients (the head's own A and B
    included, with adapter "a") against the model's full logits under plain autograd."""
    monkeypatch.setattr(rt, "packing", rt.packing and packed)
    rows = [SEQ_A, SEQ_B, SEQ_C]  # unpacked: padded to the longest
    inputs, targets = _inputs(rows)
    for name, loss_fn in _loss_fns(rows):

        def chunked(loss_fn=loss_fn):
            logps = rt.token_logprobs(adapter, inputs, targets, grad=True)
            loss_fn(logps).backward()
            return logps

        def plain(loss_fn=loss_fn):
            logps = _plain_logprobs(rt, adapter, rows)
            loss_fn(logps).backward()
            return logps

        got_lp, got = _grads(rt, adapter, chunked)
        want_lp, want = _grads(rt, adapter, plain)
        for a, b in zip(got_lp, want_lp, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)
        assert all(g.abs().sum() > 0 for g in want), name  # every adapter tensor is tested
        for a, b in zip(got, want, strict=True):
            _assert_close(a, b, rt.dtype, name)


@pytest.mark.parametrize(("fused", "keep"), [(True, False), (False, False), (True, True)])
def test_same_numbers_as_the_full_logits_path(rt, small_blocks, monkeypatch, fused, keep):
    """Chunked and full-logits paths of the service's own code: logprobs (forward, with and
    without grad, and compute_logprobs' scoring) and LoRA gradients."""
    monkeypatch.setattr(compute, "FUSED_SOFTMAX", fused)
    monkeypatch.setattr(compute, "HEAD_KEEP_LOGITS", keep)
    rows = [SEQ_A, SEQ_B, SEQ_C]
    inputs, targets = _inputs(rows)
    live = [[w != 0 for w in [0.0] * (len(x) - 3) + [1.0, 0.5, 1.0]] for x in inputs]

    def run(chunked: bool):
        monkeypatch.setattr(compute, "CHUNKED_HEAD", chunked)
        for p in rt.host.parameters("a"):
            p.grad = None
        logps = rt.token_logprobs("a", inputs, targets, grad=True, live=live)
        loss = -sum(
            (lp * torch.tensor(m, dtype=torch.float32)).sum()
            for lp, m in zip(logps, live, strict=True)
        )
        loss.backward()
        no_grad = rt.token_logprobs("a", inputs, targets, grad=False)
        scored = rt.score_rows("a", rows)
        grads = [p.grad.clone() for p in rt.host.parameters("a")]
        return [lp.detach() for lp in logps], no_grad, scored, grads

    got, want = run(True), run(False)
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b, lp in zip(got[2], want[2], got[1], strict=True):
        assert a[0] is None and b[0] is None
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(a[1:]), lp, atol=1e-6, rtol=0)
    for a, b in zip(got[3], want[3], strict=True):
        _assert_close(a, b, rt.dtype, "LoRA gradient")


def test_backward_computes_only_the_positions_a_gradient_reaches(rt, small_blocks, monkeypatch):
    """Positions with weight 0 (an SFT prompt) are recomputed in the backward pass of no
    block: the output layer's backward work is the weighted positions' only."""
    rows = [SEQ_A, SEQ_B]
    inputs, targets = _inputs(rows)
    weights = [[0.0] * (len(x) - 2) + [1.0, 0.5] for x in inputs]
    seen: list[tuple[bool, int]] = []
    plain_block = compute.head_block_logits

    def recording(x, *args):
        seen.append((torch.is_grad_enabled(), x.shape[0]))
        return plain_block(x, *args)

    monkeypatch.setattr(compute, "head_block_logits", recording)
    logps = rt.token_logprobs("a", inputs, targets, grad=True)
    forward_rows = sum(n for _, n in seen)
    seen.clear()
    loss = -sum((lp * torch.tensor(w)).sum() for lp, w in zip(logps, weights, strict=True))
    loss.backward()
    assert forward_rows >= sum(len(x) for x in inputs)
    assert sum(n for _, n in seen) == 4  # two weighted positions a row
    assert max(n for _, n in seen) <= 3  # in blocks, never the whole batch


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("keep", [False, True])
def test_gradcheck_in_float64(monkeypatch, fused, keep):
    """The hand-written backward against finite differences: hidden states, A and B, with a
    bias and with rows whose incoming gradient is 0; by the fused softmax kernels or
    logsumexp's, with the blocks' logits computed again or kept."""
    monkeypatch.setattr(compute, "FUSED_SOFTMAX", fused)
    monkeypatch.setattr(compute, "HEAD_KEEP_LOGITS", keep)
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    hidden, weight, bias = t(7, 5).requires_grad_(), t(11, 5), t(11)
    a, b = t(3, 5).requires_grad_(), t(11, 3).requires_grad_()
    target = torch.tensor([0, 3, 10, 2, 2, 7, 1])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 2.0, -1.0], dtype=torch.float64)
    monkeypatch.setattr(compute, "HEAD_CHUNK_ROWS", 2)

    def fn(hidden, a, b):
        head = compute.HeadWeights(weight, bias, a, b, 1.5)
        return compute.head_target_logprobs(head, hidden, target) * mask

    assert torch.autograd.gradcheck(fn, (hidden, a, b))
    plain = torch.log_softmax(hidden @ weight.t() + bias + 1.5 * (hidden @ a.t()) @ b.t(), -1)
    got = compute.head_target_logprobs(compute.HeadWeights(weight, bias, a, b, 1.5), hidden, target)
    torch.testing.assert_close(got, plain.gather(-1, target[:, None])[:, 0])
