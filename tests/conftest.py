"""Shared fixtures: a temporary workspace on the tiny random model, small budgets everywhere."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # works without `pip install -e .`
    sys.path.insert(0, str(REPO))

from engine.store.atomic import atomic_write_text  # noqa: E402
from engine.store.workspace import Workspace, init_workspace  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

TINY = "persona/tiny-random"

TINY_TOML = f'''
[backend]
name = "local"

[models]
policy = "{TINY}"
teacher = "{TINY}"
judge = "{TINY}"

[sampling]
max_tokens = 16
temperature = 1.0
concurrency = 4

[synth_inputs]
per_seed = 3
max_seeds = 2
retries = 1
max_tokens = 48

[synth_outputs]
max_tokens = 16
concurrency = 4

[sft]
steps = 4
batch_size = 2
rank = 4
checkpoint_every = 2
max_length = 256
val_fraction = 0.25
train_on = "non-rejected"
'''


def adapted_runtime(dtype: str = "fp32", targets: tuple[str, ...] | None = None, name: str = "a"):
    """The tiny model's runtime with adapter ``name`` on ``targets`` (every LoRA target by
    default), its weights moved off their start (B = 0 would hide every LoRA term)."""
    import torch

    from engine.backends.local import TINY_MODEL
    from engine.backends.local.compute import BaseRuntime
    from engine.backends.local.lora import ATTN_MODULES, MLP_MODULES, UNEMBED_MODULES, LoraSpec
    from engine.backends.local.models import choose_compute

    rt = BaseRuntime(TINY_MODEL, choose_compute("cpu", dtype))
    rt.host.add(name, LoraSpec(4, 8.0, targets or ATTN_MODULES + MLP_MODULES + UNEMBED_MODULES))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in rt.host.parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return rt


def make_tiny_workspace(root: Path) -> Workspace:
    ws = init_workspace(root)
    atomic_write_text(ws.config_path, TINY_TOML)
    return ws


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_tiny_workspace(tmp_path / "ws")


@pytest.fixture
def sp(tmp_path: Path, monkeypatch):
    """The speed_profile module with its cache in a temporary folder, measuring short rows
    on one thread (tests check the measurement and what is shown, not this machine)."""
    import torch

    from engine.backends.local import hardware, speed_profile

    monkeypatch.setattr(hardware, "_configured", hardware._configured)  # restored after
    monkeypatch.setattr(speed_profile, "speed_dir", lambda: tmp_path / "speed")
    for name, value in (
        ("PREFILL_LEN", 32),
        ("TRAIN_LEN", 32),
        ("DECODE_TOKENS", 4),
        ("CONTEXT_PROMPT", 48),
    ):
        monkeypatch.setattr(speed_profile, name, value)
    monkeypatch.setenv("PERSONA_THREADS", "1")  # what configure_threads (ensure_profile) sets
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield speed_profile
    torch.set_num_threads(before)


def hand_profile(key, **values):
    """A hand-made speed profile: round rates, no join or context cost unless given, so a
    test's arithmetic is exact."""
    from engine.backends.local.speed_profile import SpeedProfile

    rates = dict(
        prefill_tokens_per_s=1000.0,
        train_tokens_per_s=100.0,
        optim_step_s=0.5,
        decode_tokens_per_s={1: 10.0, 8: 40.0, 32: 80.0},
        request_s=0.0,
        prompt_tokens_per_s=1e12,
        context_s_per_token=0.0,
        load_s=2.0,
        checkpoint_s=0.25,
    )
    return SpeedProfile(key=key, **{**rates, **values})


def backend_ready() -> bool:
    try:
        from engine.backends import make_service_client  # noqa: F401
        from engine.backends.local import LocalServiceClient  # noqa: F401
    except ImportError:
        return False
    return True


needs_backend = pytest.mark.skipif(
    not backend_ready(), reason="engine.backends (local) not available yet"
)


@pytest.fixture(scope="session", autouse=True)
def _models_materialized():
    """Build the default model before the tiny one (the tiny one borrows its tokenizer)."""
    if backend_ready():
        from engine.backends.local import DEFAULT_MODEL, ensure_model_dir

        ensure_model_dir(DEFAULT_MODEL)
        ensure_model_dir(TINY)
    yield


class FakeTeacher:
    """A service whose sampling clients reply with canned texts (in call order), tokenized for real."""

    def __init__(self, replies):
        self.replies = replies if callable(replies) else list(replies)
        self.prompts: list[str] = []

    def __call__(self, backend, *, checkpoint_dir, env):  # the service factory
        return self

    def create_sampling_client(self, base_model=None, model_path=None, **_):
        return self

    def get_tokenizer(self):
        from transformers import AutoTokenizer

        from engine.backends.local import ensure_model_dir

        if not hasattr(self, "_tok"):
            self._tok = AutoTokenizer.from_pretrained(ensure_model_dir(TINY))
        return self._tok

    async def sample(self, prompt, num_samples, sampling_params):
        from types import SimpleNamespace

        tok = self.get_tokenizer()
        self.prompts.append(tok.decode(prompt.to_ints()))
        if callable(self.replies):
            text = self.replies(self.prompts[-1])
        else:
            text = self.replies.pop(0) if self.replies else ""
        tokens = tok.encode(text, add_special_tokens=False) + [2]
        return SimpleNamespace(
            sequences=[SimpleNamespace(tokens=tokens, logprobs=None, stop_reason="stop")]
        )


# -- a scripted teacher ----------------------------------------------------------------------
# The tiny random model writes noise, which the request filter rightly rejects. Chain tests that
# need synthetic requests use this factory: the real local service for everything, except that
# a teacher prompt asking for new requests gets a canned JSON list of realistic ones.

TEACHER_MARK = "You write requests that a person gives"
_PEOPLE = [("Dana", "landlord"), ("Dr. Lee", "dentist"), ("Priya", "manager"), ("Omar", "coach")]


def scripted_requests(prompt_text: str, n: int = 4) -> list[str]:
    import re

    topic = re.search(r"on this topic: (.+?)\.\n", prompt_text)
    about = topic.group(1) if topic else "a schedule change"
    salt = abs(hash(prompt_text)) % 997
    return [
        f"Write to {name}, my {role}, about {about}: ask to move it to March {(salt + i) % 27 + 1} "
        f"and mention the {salt + i} dollar invoice."
        for i, (name, role) in enumerate(_PEOPLE[:n])
    ]


class _ScriptedSampling:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def sample(self, prompt, num_samples=1, sampling_params=None, **kw):
        import json as _json
        import uuid

        import numpy as np
        import tinker

        tok = self._inner.get_tokenizer()
        text = tok.decode(prompt.to_ints())
        if TEACHER_MARK not in text:
            return self._inner.sample(prompt, num_samples, sampling_params, **kw)
        tokens = tok.encode(_json.dumps(scripted_requests(text)), add_special_tokens=False) + [2]
        seq = tinker.SampledSequence(
            stop_reason="stop",
            sequence_id=uuid.uuid4().hex,
            tokens_np=np.array(tokens, dtype=np.int64),
            logprobs_np=np.zeros(len(tokens), dtype=np.float32),
        )
        return tinker.SampleResponse(sequences=[seq] * num_samples)


class _ScriptedService:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def create_sampling_client(self, *args, **kw):
        from engine.llm.sampling import resolve

        async def make():
            return _ScriptedSampling(await resolve(self._inner.create_sampling_client(*args, **kw)))

        return make()


def scripted_teacher_factory(backend, **kw):
    from engine.run.context import default_service_factory

    return _ScriptedService(default_service_factory(backend, **kw))


def pytest_unconfigure(config):
    """The SDK's heartbeat threads of sessions whose test server has stopped keep running until
    the interpreter exits; their "Tinker is down" warnings would be the last lines printed."""
    import logging

    logging.getLogger("tinker.lib.internal_client_holder").setLevel(logging.ERROR)
