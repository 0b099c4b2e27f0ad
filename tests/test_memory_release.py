"""A closed local service hands the memory its models and steps freed back to the system."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from engine.backends.local import TINY_MODEL, LocalServiceClient, memory


def test_closing_the_service_frees_its_models_then_returns_the_memory(monkeypatch, tmp_path):
    svc = LocalServiceClient(tmp_path, dtype="float32")
    svc.create_lora_training_client(TINY_MODEL, rank=4, seed=0).result()
    assert svc._runtimes  # the model is loaded
    seen: list[dict] = []
    monkeypatch.setattr(
        memory, "release_free_memory", lambda: seen.append(dict(svc._runtimes)) or True
    )
    closed = svc.close()
    assert closed.result(timeout=120) is True  # resolves once the memory is released
    assert seen == [{}]  # once, on the compute thread, after the models were let go
    assert svc.close().result(timeout=5) is None  # closing again: nothing left to do


def test_without_malloc_trim_nothing_is_done(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_free_memory() is False


@pytest.mark.skipif(
    platform.system() != "Linux"
    or platform.libc_ver()[0] != "glibc"
    or ctypes.util.find_library("c") is None,
    reason="malloc_trim is glibc's",
)
def test_on_glibc_the_allocator_is_trimmed(monkeypatch):
    real = memory._malloc_trim()
    assert real is not None
    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: calls.append(pad) or real(pad))
    assert memory.release_free_memory() is True
    assert calls == [0]  # everything above each heap's minimum, in every arena
