"""bf16 forwards on a CPU run each base weight through its oneDNN-packed copy: the same
numbers as F.linear, every forward path alike, and the copy follows the weight."""

from __future__ import annotations

import pytest
import torch

from engine.backends.local import TINY_MODEL, lora

SEQ_A = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
SEQ_B = [2, 71, 82, 81, 82, 84, 59]


@pytest.fixture(scope="module")
def runtime():
    from conftest import adapted_runtime

    return adapted_runtime("bf16")


def _layer(rt):
    return rt.host.layers["model.layers.0.mlp.up_proj"]


def _run(rt, adapter):
    inputs, targets = [SEQ_A[:-1], SEQ_B[:-1]], [SEQ_A[1:], SEQ_B[1:]]
    for p in rt.host.parameters("a"):
        p.grad = None
    logps = rt.token_logprobs(adapter, inputs, targets, grad=True)
    if adapter is not None:
        sum(lp.float().sum() for lp in logps).backward()
    grads = [p.grad.clone() for p in rt.host.parameters("a") if p.grad is not None]
    with torch.no_grad():
        plain = rt.token_logprobs(adapter, inputs, targets, grad=False)
    return [lp.detach() for lp in logps], grads, plain


@pytest.mark.parametrize("adapter", [None, "a"])
def test_the_packed_forward_gives_what_f_linear_gives(runtime, monkeypatch, adapter):
    packed = _run(runtime, adapter)
    if _layer(runtime)._packed is None or _layer(runtime)._packed[1] is None:
        pytest.skip("this PyTorch cannot pack weights for oneDNN")
    monkeypatch.setattr(lora, "PACKED_FORWARD", False)
    plain = _run(runtime, adapter)
    for a, b in zip(packed, plain, strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    # With and without gradients the packed path computes the same logprobs.
    for x, y in zip(packed[0], packed[2], strict=True):
        assert torch.equal(x, y)


def test_the_packed_copy_is_made_once_and_follows_the_weight(runtime):
    layer = _layer(runtime)
    x = torch.randn(3, layer.base.in_features, dtype=torch.bfloat16)
    runtime.host.switch.active = None
    first = layer(x)
    if layer._packed is None or layer._packed[1] is None:
        pytest.skip("this PyTorch cannot pack weights for oneDNN")
    copy = layer._packed[1]
    assert torch.equal(layer(x), first) and layer._packed[1] is copy  # made once
    assert torch.allclose(first.float(), torch.nn.functional.linear(x, layer.base.weight).float())
    saved = layer.base.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.base.weight.mul_(2.0)  # a changed weight is packed again
        assert layer._packed[1] is copy and not torch.equal(layer(x), first)
        assert layer._packed[1] is not copy
    finally:
        with torch.no_grad():
            layer.base.weight.copy_(saved)


def test_float32_and_the_vocabulary_head_are_not_packed(runtime):
    head = runtime.model.get_output_embeddings()
    assert head._packed_weight() is None  # it writes into its OutputBuffer
    layer = _layer(runtime)
    layer.base.weight.data = layer.base.weight.data.float()
    try:
        assert layer._packed_weight() is None
    finally:
        layer.base.weight.data = layer.base.weight.data.to(torch.bfloat16)


def test_the_decoder_shares_the_packed_copies_instead_of_making_its_own(monkeypatch):
    """o, gate, up and down reuse the training forward's packed weight (q|k|v is its own
    concatenation, the head its own); greedy tokens are the ones its own copies give."""
    from engine.backends.local.compute import BaseRuntime, GenRow, make_generator
    from engine.backends.local.models import choose_compute

    def greedy(rt):
        g = make_generator(0)
        rows = [GenRow(SEQ_A, 12, 0.0, 1.0, -1, frozenset(), (), g) for _ in range(2)]
        return [(r.tokens, r.logprobs) for r in rt.generate(None, rows)]

    rt = BaseRuntime(TINY_MODEL, choose_compute("cpu", "bf16"))
    first = rt.decoder._fused()[0]
    mlp = rt.model.model.layers[0].mlp
    if mlp.up_proj._packed_weight() is None:
        pytest.skip("this PyTorch cannot pack weights for oneDNN")
    assert first["up"].packed is mlp.up_proj._packed_weight()
    assert first["down"].packed is mlp.down_proj._packed_weight()
    assert first["qkv"].packed is not rt.model.model.layers[0].self_attn.q_proj._packed_weight()
    shared = greedy(rt)

    monkeypatch.setattr(lora, "PACKED_FORWARD", False)
    own = BaseRuntime(TINY_MODEL, choose_compute("cpu", "bf16"))
    assert own.decoder._fused()[0]["up"].packed is not None  # packed by the decoder itself
    for (tok_a, lp_a), (tok_b, lp_b) in zip(shared, greedy(own), strict=True):
        assert tok_a == tok_b
        assert torch.allclose(torch.tensor(lp_a), torch.tensor(lp_b), atol=1e-2)


def test_gradients_flow_through_packed_layers_that_have_no_adapter(monkeypatch):
    """An adapter on the attention alone: the MLP's packed linears sit between adapted layers,
    so the input gradient must pass through them (oneDNN's packed linear has no backward of
    its own; without one the first layers' gradients would silently be wrong)."""
    from conftest import adapted_runtime

    from engine.backends.local.lora import ATTN_MODULES

    rt = adapted_runtime("bf16", ATTN_MODULES, name="attn")

    def grads():
        for p in rt.host.parameters("attn"):
            p.grad = None
        logps = rt.token_logprobs("attn", [SEQ_A[:-1]], [SEQ_A[1:]], grad=True)
        logps[0].float().sum().backward()
        return [p.grad.clone() for p in rt.host.parameters("attn")]

    packed = grads()
    if rt.model.model.layers[0].mlp.up_proj._packed_weight() is None:
        pytest.skip("this PyTorch cannot pack weights for oneDNN")
    monkeypatch.setattr(lora, "PACKED_FORWARD", False)
    plain = grads()
    first_layer = rt.host.layers["model.layers.0.self_attn.q_proj"].lora_B["attn"]
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0
    for a, b in zip(packed, plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-4)
