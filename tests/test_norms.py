"""The fused RMSNorm the local service trains through: the model's numbers forward, bit for
bit, and autograd's gradient through the model's own norm backward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from engine.backends.local import norms


def _norm(dtype: torch.dtype, trainable: bool) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.3, 1.7, 48))
    norm.weight.requires_grad_(trainable)
    return norm


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-6), (torch.float64, 0.0), (torch.bfloat16, 0.02)]
)
@pytest.mark.parametrize("trainable", [False, True])
def test_fused_norm_matches_the_models_norm_forward_and_backward(dtype, atol, trainable):
    theirs = _norm(dtype, trainable)
    ours = copy.deepcopy(theirs)
    assert norms.install(ours) == 1
    g = torch.Generator().manual_seed(0)
    # Rows of very different sizes: the statistics are per row.
    x = torch.randn(3, 5, 48, generator=g) * torch.tensor([0.01, 1.0, 40.0])[:, None, None]
    x = x.to(dtype)
    up = torch.randn(3, 5, 48, generator=g).to(dtype)

    def run(norm):
        xi = x.clone().requires_grad_()
        out = norm(xi)
        out.backward(up)
        return out.detach(), xi.grad, norm.weight.grad

    out_t, dx_t, dw_t = run(theirs)
    out_o, dx_o, dw_o = run(ours)
    assert torch.equal(out_o, out_t)
    scale = dx_t.abs().amax(-1, keepdim=True).float()  # rows differ by 4,000x in size
    assert ((dx_o.float() - dx_t.float()).abs() / scale).max() <= atol
    assert dx_o.dtype == x.dtype
    if trainable:
        assert torch.allclose(dw_o.float(), dw_t.float(), rtol=atol * 5, atol=atol * 5)
    else:
        assert dw_o is None and dw_t is None


def test_without_gradients_the_norm_takes_no_autograd_node():
    norm = _norm(torch.float32, False)
    norms.install(norm)
    x = torch.randn(2, 48, requires_grad=True)
    with torch.no_grad():
        assert norm(x).grad_fn is None
    assert type(norm(x).grad_fn).__name__ == "_RMSNormFnBackward"


def test_install_routes_every_llama_norm_of_a_model():
    from conftest import TINY
    from transformers import AutoModelForCausalLM

    from engine.backends.local.models import ensure_model_dir

    model = AutoModelForCausalLM.from_pretrained(ensure_model_dir(TINY))
    layers = model.config.num_hidden_layers
    assert norms.install(model) == 2 * layers + 1  # two per layer and the final one


def test_a_trainable_weight_alone_gets_its_gradient():
    theirs = _norm(torch.float32, True)
    ours = copy.deepcopy(theirs)
    norms.install(ours)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(3))
    for norm in (theirs, ours):
        norm(x).square().sum().backward()
    assert torch.allclose(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-6)


def test_without_pytorchs_fused_kernel_the_backward_recomputes_what_it_needs(monkeypatch):
    theirs = _norm(torch.float32, False)
    ours = _norm(torch.float32, False)
    norms.install(ours)
    monkeypatch.setattr(norms, "_fused_rms_norm", lambda: None)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(5))
    grads = []
    for norm in (theirs, ours):
        xi = x.clone().requires_grad_()
        norm(xi).square().sum().backward()
        grads.append(xi.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_a_weight_of_another_dtype_gives_the_models_dtype_and_numbers(grad):
    theirs = _norm(torch.float32, False)
    ours = copy.deepcopy(theirs)
    norms.install(ours)
    x = (torch.randn(3, 48, generator=torch.Generator().manual_seed(4)) * 3).to(torch.bfloat16)
    x.requires_grad_(grad)
    want, got = theirs(x), ours(x)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
