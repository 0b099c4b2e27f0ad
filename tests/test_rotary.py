"""The rotary embedding the local service trains through: the model's numbers bit for bit,
forward and backward, alone and inside the model."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.backends.local import rotary


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    # (batch, seq, heads, dim) transposed to (batch, heads, seq, dim), as the model does
    q = (torch.randn(2, 7, 4, 16, generator=g) * 3).to(dtype).transpose(1, 2)
    k = (torch.randn(2, 7, 2, 16, generator=g) * 3).to(dtype).transpose(1, 2)
    angle = torch.arange(7)[None, :, None] * torch.logspace(0, -3, 8)[None, None, :]
    angle = torch.cat((angle, angle), -1).expand(2, -1, -1)
    return q, k, angle.cos().to(dtype), angle.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_gives_the_models_numbers_and_gradients_bit_for_bit(dtype):
    q, k, cos, sin = _inputs(dtype)
    g = torch.Generator().manual_seed(1)
    up_q = torch.randn(q.shape, generator=g).to(dtype)
    up_k = torch.randn(k.shape, generator=g).to(dtype)

    def run(fn):
        qi, ki = q.detach().requires_grad_(), k.detach().requires_grad_()
        out_q, out_k = fn(qi, ki, cos, sin)
        torch.autograd.backward((out_q, out_k), (up_q, up_k))
        return out_q.detach(), out_k.detach(), qi.grad, ki.grad

    theirs = run(apply_rotary_pos_emb)
    ours = run(rotary.apply)
    assert type(rotary.apply(q.requires_grad_(), k, cos, sin)[0].grad_fn).__name__ == (
        "_RotaryFnBackward"
    )
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_without_gradients_the_rotary_takes_no_autograd_node():
    q, k, cos, sin = _inputs(torch.float32)
    q.requires_grad_()
    with torch.no_grad():
        out_q, _ = rotary.apply(q, k, cos, sin)
    assert out_q.grad_fn is None
    assert torch.equal(out_q, apply_rotary_pos_emb(q, k, cos, sin)[0].detach())


def test_the_model_with_the_fused_rotary_computes_what_it_computed_before(monkeypatch):
    """Every attention layer of the tiny Llama routed: the same logits and the same input
    gradient as the model's own attention, and a key/value cache still works (generate)."""
    from conftest import TINY
    from transformers import AutoModelForCausalLM

    from engine.backends.local.models import ensure_model_dir

    model = AutoModelForCausalLM.from_pretrained(ensure_model_dir(TINY), dtype=torch.float32)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4]])

    def run():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        logits.square().mean().backward()
        return logits.detach(), embeds.grad

    before = run()
    assert rotary.install(model) == model.config.num_hidden_layers
    calls = []
    fused = rotary._RotaryFn.apply
    monkeypatch.setattr(rotary._RotaryFn, "apply", lambda *a: calls.append(1) or fused(*a))
    after = run()
    assert len(calls) == 2 * model.config.num_hidden_layers  # q and k of every layer
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    monkeypatch.setattr(rotary, "FUSED_ROTARY", False)
    assert torch.equal(run()[1], before[1])
    monkeypatch.setattr(rotary, "FUSED_ROTARY", True)

    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False, attention_mask=None)
    with torch.no_grad():
        full = model(out, use_cache=False).logits
    # greedy: each new token is the argmax of the cache-free forward at its position
    assert out[0, 8:].tolist() == full[0, 7:-1].argmax(-1).tolist()
