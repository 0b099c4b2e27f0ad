"""LoRA layers that read one input (q|k|v, gate|up) train as one autograd node: the same
outputs, op for op, and the gradients of the layer-by-layer computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.backends.local import lora

SEQ_A = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
SEQ_B = [2, 71, 82, 81, 82, 84, 59]


def _layers(outs: tuple[int, ...], dtype: torch.dtype, bias: bool) -> tuple[lora.LoraLinear, ...]:
    g = torch.Generator().manual_seed(0)
    switch = lora.AdapterSwitch()
    switch.active = "a"
    layers = []
    for out in outs:
        base = nn.Linear(24, out, bias=bias).to(dtype)
        with torch.no_grad():
            base.weight.copy_(torch.randn(base.weight.shape, generator=g))
            if bias:
                base.bias.copy_(torch.randn(out, generator=g))
        base.requires_grad_(False)
        layer = lora.LoraLinear(base, switch, "q_proj")
        layer.lora_A["a"] = torch.randn(4, 24, generator=g).requires_grad_(True)
        layer.lora_B["a"] = torch.randn(out, 4, generator=g).requires_grad_(True)
        layer.scales["a"] = 2.0
        layers.append(layer)
    return tuple(layers)


def _forward_backward(layers, x0: torch.Tensor, shared: bool, monkeypatch):
    monkeypatch.setattr(lora, "SHARED_INPUT", shared)
    for layer in layers:
        layer.lora_A["a"].grad = layer.lora_B["a"].grad = None
    x = x0.clone().requires_grad_(True)
    outs = lora.shared_input(x, layers)
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, ups)
    grads = [x.grad] + [t.grad for layer in layers for t in (layer.lora_A["a"], layer.lora_B["a"])]
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_node_gives_the_layer_by_layer_outputs_and_gradients(monkeypatch, dtype, bias):
    layers = _layers((12, 6, 6), dtype, bias)
    x0 = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    calls = []
    real = lora._SharedInputLoraFn.apply
    monkeypatch.setattr(lora._SharedInputLoraFn, "apply", lambda *a: calls.append(1) or real(*a))
    outs, grads = _forward_backward(layers, x0, True, monkeypatch)
    assert calls == [1]
    want_outs, want_grads = _forward_backward(layers, x0, False, monkeypatch)
    assert calls == [1]  # layer by layer the second time
    for got, want in zip(outs, want_outs, strict=True):
        assert torch.equal(got, want)  # the forward is each layer's own, op for op
    for got, want in zip(grads, want_grads, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # the input's gradient is summed in float32 inside the matmuls, rounded once
            err = float((got.float() - want.float()).norm() / want.float().norm())
            assert err < 1e-2


def test_layers_that_cannot_share_go_one_by_one(monkeypatch):
    layers = _layers((12, 6), torch.float32, False)
    x = torch.randn(3, 24, requires_grad=True)
    calls = []
    monkeypatch.setattr(lora._SharedInputLoraFn, "apply", lambda *a: calls.append(1))
    layers[1].scales["a"] = 4.0  # two scales: no shared node
    assert len(lora.shared_input(x, layers)) == 2
    layers[1].scales["a"] = 2.0
    layers[0].switch.active = None  # the base model: nothing to train
    lora.shared_input(x, layers)
    layers[0].switch.active = "a"
    with torch.no_grad():  # sampling and scoring
        lora.shared_input(x, layers)
    assert calls == []
    lora.shared_input(x, layers)
    assert calls == [1]


def _run(rt, shared: bool, monkeypatch):
    monkeypatch.setattr(lora, "SHARED_INPUT", shared)
    inputs, targets = [SEQ_A[:-1], SEQ_B[:-1]], [SEQ_A[1:], SEQ_B[1:]]
    for p in rt.host.parameters("a"):
        p.grad = None
    logps = rt.token_logprobs("a", inputs, targets, grad=True)
    sum(lp.float().sum() for lp in logps).backward()
    grads = [p.grad.clone() for p in rt.host.parameters("a")]
    with torch.no_grad():
        plain = rt.token_logprobs("a", inputs, targets, grad=False)
    return [lp.detach() for lp in logps], grads, plain


@pytest.mark.parametrize(
    ("dtype", "targets", "groups"),
    [
        ("fp32", None, [3, 2]),
        ("bf16", None, [3, 2]),
        ("fp32", lora.MLP_MODULES, [2]),  # q, k and v have no adapter: the model's own calls
    ],
)
def test_the_model_trains_through_shared_nodes_with_the_same_numbers(
    monkeypatch, dtype, targets, groups
):
    from conftest import adapted_runtime

    rt = adapted_runtime(dtype, targets)
    sizes = []
    real = lora._SharedInputLoraFn.apply
    monkeypatch.setattr(
        lora._SharedInputLoraFn,
        "apply",
        lambda x, layers, *a: sizes.append(len(layers)) or real(x, layers, *a),
    )
    logps, grads, plain = _run(rt, True, monkeypatch)
    n_layers = rt.model.config.num_hidden_layers
    assert sorted(sizes) == sorted(groups * n_layers)  # every layer's groups, once each
    want_logps, want_grads, _ = _run(rt, False, monkeypatch)
    for got, want, no_grad in zip(logps, want_logps, plain, strict=True):
        assert torch.equal(got, want) and torch.equal(got, no_grad)
    for got, want in zip(grads, want_grads, strict=True):
        if rt.dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        else:
            err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
            assert err < 3e-2
