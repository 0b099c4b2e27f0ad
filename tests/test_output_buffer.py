"""The vocabulary head writes its logits into one reused tensor: never while an earlier
output is still held, and with the numbers and gradients of a fresh one."""

from __future__ import annotations

import pytest
import torch

from engine.backends.local.lora import OutputBuffer

SEQ_A = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
SEQ_B = [2, 71, 82, 81, 82, 84, 59]


def test_the_buffer_is_lent_again_only_once_nobody_holds_it(monkeypatch):
    monkeypatch.setattr(OutputBuffer, "MIN_BYTES", 0)
    buffer = OutputBuffer()
    cpu = torch.device("cpu")
    first = buffer.take((4, 6), torch.float32, cpu)
    address = first.data_ptr()
    assert buffer.take((4, 6), torch.float32, cpu) is None  # `first` still holds it
    view = first[1:]
    del first
    assert buffer.take((4, 6), torch.float32, cpu) is None  # so does a view of it
    del view
    again = buffer.take((2, 6), torch.float32, cpu)
    assert again.shape == (2, 6) and again.data_ptr() == address
    del again
    bigger = buffer.take((8, 6), torch.float32, cpu)
    assert bigger.shape == (8, 6)  # grown: a new, larger tensor
    del bigger
    assert buffer.take((4, 6), torch.bfloat16, cpu).dtype == torch.bfloat16


def test_small_or_huge_outputs_are_allocated_as_usual():
    buffer = OutputBuffer()
    cpu = torch.device("cpu")
    assert buffer.take((4, 6), torch.float32, cpu) is None  # under MIN_BYTES
    assert buffer.take((1 << 20, 1 << 10), torch.float32, cpu) is None  # over MAX_BYTES


@pytest.mark.parametrize("adapter", [None, "a"])
def test_logits_written_into_the_buffer_give_the_same_logprobs_and_gradients(monkeypatch, adapter):
    from conftest import adapted_runtime

    rt = adapted_runtime()
    head = rt.model.get_output_embeddings()
    inputs, targets = [SEQ_A[:-1], SEQ_B[:-1]], [SEQ_A[1:], SEQ_B[1:]]

    def run():
        for p in rt.host.parameters("a"):
            p.grad = None
        logps = rt.token_logprobs(adapter, inputs, targets, grad=True)
        if adapter is not None:  # the base model has nothing to train
            sum(lp.sum() for lp in logps).backward()
        grads = [p.grad.clone() for p in rt.host.parameters("a") if p.grad is not None]
        with torch.no_grad():
            plain = rt.token_logprobs(adapter, inputs, targets, grad=False)
        return [lp.detach() for lp in logps], grads, plain

    fresh = run()
    assert head.out_buffer._buf is None  # the tiny model's logits are under MIN_BYTES
    monkeypatch.setattr(OutputBuffer, "MIN_BYTES", 0)
    lent = run()
    assert head.out_buffer._buf is not None
    address = head.out_buffer._buf.data_ptr()
    again = run()
    assert head.out_buffer._buf.data_ptr() == address  # the same tensor, step after step
    for a, b in zip(fresh, lent, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(lent, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert (adapter is None) == (not fresh[1])  # the adapter's gradients, when it trains
