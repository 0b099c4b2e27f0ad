"""The Tinker path with an SDK-shaped fake (no network): renderers, hub, errors, retries,
bounded connection, threads, TTLs, resume checks. What a real
server can show (a refused key, metadata, sessions finished, resume, a lost server) runs
with the real SDK against `persona serve` in test_serve*.py; the fakes here stand for what
only Tinker's own service does (billing, rate limits, an expired checkpoint)."""

from __future__ import annotations

import os
import sys
import threading
from types import SimpleNamespace

import httpx
import pytest
import tinker

from engine.backends import (
    BackendConfigError,
    configure_hub,
    make_service_client,
    not_found_as_file_error,
)
from engine.backends.renderers import (
    SMOLLM2_RENDERER,
    RendererError,
    renderer_name_for,
)
from engine.backends.tinker_service import (
    PERIODIC_TTL_SECONDS,
    CheckpointNotFound,
    TinkerAccountError,
    TinkerService,
    TinkerUnreachable,
)
from engine.store.settings import TINKER_MODELS

REQ = httpx.Request("POST", "https://tinker.invalid/api")


def status_error(cls: type, code: int) -> Exception:
    return cls(f"{code} error", response=httpx.Response(code, request=REQ), body=None)


class Future:
    def __init__(self, value):
        self.value = value

    def result(self):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class FakeTokenizer:
    """Stands in for the SDK's tokenizer: the client must hand back what the SDK gave."""


class FakeTrainingClient:
    def __init__(self, svc):
        self.svc = svc

    def get_tokenizer(self):
        self.svc.tokenizer_threads.append(threading.current_thread())
        return FakeTokenizer()

    def save_state(self, name, ttl_seconds=None, overwrite=False, user_metadata=None):
        self.svc.saves.append(("state", name, ttl_seconds, user_metadata))
        return Future(SimpleNamespace(path=f"tinker://run/weights/{name}"))

    def save_weights_for_sampler(self, name, ttl_seconds=None, user_metadata=None):
        self.svc.saves.append(("sampler", name, ttl_seconds, user_metadata))
        return Future(SimpleNamespace(path=f"tinker://run/sampler_weights/{name}"))


class FakeServiceClient:
    """tinker.ServiceClient's shape: futures with .result(), real SDK exception classes."""

    def __init__(
        self, user_metadata=None, project_id=None, *, display_name=None, api_key=None, **kw
    ):
        self.user_metadata, self.display_name, self.api_key = user_metadata, display_name, api_key
        self.probe_errors: list[Exception] = []
        self.create_errors: list[Exception] = []
        self.hang = False
        self.tokenizer_threads: list = []
        self.create_threads: list = []
        self.saves: list = []
        self.created: list = []
        self.closed: list = []
        self.run_info = SimpleNamespace(base_model="Qwen/Qwen3-4B-Instruct-2507", user_metadata={})

    def get_server_capabilities(self):
        if self.hang:
            threading.Event().wait(60)
        if self.probe_errors:
            raise self.probe_errors.pop(0)
        return Future(SimpleNamespace(supported_models=[]))

    def create_lora_training_client(self, base_model, rank=32, seed=None, user_metadata=None, **kw):
        self.create_threads.append(threading.current_thread())
        self.created.append(("lora", base_model, user_metadata))
        if self.create_errors:
            return Future(self.create_errors.pop(0))
        return Future(FakeTrainingClient(self))

    def create_training_client_from_state_with_optimizer(self, path, user_metadata=None, **kw):
        self.created.append(("state", path, user_metadata))
        if self.create_errors:
            return Future(self.create_errors.pop(0))
        return Future(FakeTrainingClient(self))

    def create_rest_client(self):
        svc = self

        class Rest:
            def get_training_run_by_tinker_path(self, path):
                if svc.create_errors:
                    return Future(svc.create_errors.pop(0))
                return Future(svc.run_info)

        return Rest()

    def create_sampling_client(self, model_path=None, base_model=None, **kw):
        tc = FakeTrainingClient(self)
        return Future(SimpleNamespace(get_tokenizer=tc.get_tokenizer, sample=lambda **k: None))

    def close(self, status, detail=None):
        self.closed.append((status, detail))
        return Future(None)


async def no_sleep(_s):
    return None


def service(**kw) -> tuple[TinkerService, FakeServiceClient]:
    fake = FakeServiceClient()
    return TinkerService(fake, sleep=no_sleep, **kw), fake


# -- renderers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "renderer"),
    [
        ("Qwen/Qwen3-4B-Instruct-2507", "qwen3_instruct"),
        ("Qwen/Qwen3-8B", "qwen3"),
        ("Qwen/Qwen3-8B-Base", "role_colon"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3"),
        ("meta-llama/Llama-3.1-8B", "role_colon"),
        ("deepseek-ai/DeepSeek-V3.1", "deepseekv3"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_RENDERER),
        ("persona/tiny-random", SMOLLM2_RENDERER),
    ],
)
def test_renderer_from_the_cookbook_registry(model, renderer):
    assert renderer_name_for(model) == renderer


def test_every_tinker_default_and_every_served_model_has_its_registry_renderer():
    from tinker_cookbook import model_info

    for m in (TINKER_MODELS.policy, TINKER_MODELS.teacher, TINKER_MODELS.judge):
        assert renderer_name_for(m) == model_info.get_recommended_renderer_name(m)
    for org, table in (
        ("Qwen", model_info.get_qwen_info()),
        ("meta-llama", model_info.get_llama_info()),
    ):
        for version in table:
            name = f"{org}/{version}"
            assert renderer_name_for(name) == model_info.get_recommended_renderer_name(name)


def test_local_folder_gets_smollm_and_unknown_names_are_an_error(tmp_path):
    assert renderer_name_for(str(tmp_path)) == SMOLLM2_RENDERER
    with pytest.raises(
        RendererError, match="No chat renderer is known for model 'someone/unknown-7b'"
    ):
        renderer_name_for("someone/unknown-7b")


# -- hub ----------------------------------------------------------------------------------


def test_hub_off_only_for_the_local_backend(monkeypatch):
    import huggingface_hub.constants as hub

    import engine.backends as backends

    monkeypatch.setattr(backends, "_USER_HUB_OFFLINE", None)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    configure_hub("local")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.HF_HUB_OFFLINE is True
    configure_hub("tinker")  # the app switching backend between runs: the hub comes back on
    assert "HF_HUB_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE is False
    monkeypatch.setattr(backends, "_USER_HUB_OFFLINE", "1")  # the person's own choice stays
    configure_hub("tinker")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# -- errors ---------------------------------------------------------------------------------


def test_missing_key_is_actionable_without_a_class_prefix():
    with pytest.raises(BackendConfigError) as e:
        make_service_client("tinker", env={})
    assert str(e.value).startswith("The tinker backend needs TINKER_API_KEY")


async def test_billing_errors_say_what_to_do():
    """A refused key is tested against a real server (test_serve.py); a billing refusal is
    what only Tinker's own service gives."""
    svc, fake = service()
    fake.create_errors = [status_error(tinker.BillingError, 402)]
    with pytest.raises(TinkerAccountError, match="billing or quota"):
        await svc.create_lora_training_client("Qwen/Qwen3-4B-Instruct-2507")


async def test_transient_errors_are_retried_with_backoff():
    delays: list[float] = []

    async def sleep(s):
        delays.append(s)

    fake = FakeServiceClient()
    svc = TinkerService(fake, sleep=sleep)
    fake.create_errors = [
        status_error(tinker.RateLimitError, 429),
        status_error(tinker.InternalServerError, 500),
    ]
    tc = await svc.create_lora_training_client("Qwen/Qwen3-4B-Instruct-2507", rank=8)
    assert isinstance(tc.get_tokenizer(), FakeTokenizer)
    assert delays == [0.5, 1.0]  # exponential backoff


async def test_not_found_on_resume_is_a_file_not_found_error():
    svc, fake = service()
    fake.create_errors = [status_error(tinker.NotFoundError, 404)]
    with pytest.raises(FileNotFoundError):
        await svc.create_training_client_from_state_with_optimizer("tinker://gone/weights/step-1")
    # the helper for stage code that talks to the SDK directly
    with pytest.raises(FileNotFoundError), not_found_as_file_error():
        raise status_error(tinker.NotFoundError, 404)


async def test_resume_checks_the_renderer():
    svc, fake = service()
    fake.run_info = SimpleNamespace(
        base_model="Qwen/Qwen3-4B-Instruct-2507", user_metadata={"renderer": "persona/smollm2"}
    )
    with pytest.raises(CheckpointNotFound, match="renderer"):
        await svc.create_training_client_from_state_with_optimizer("tinker://r/weights/step-1")
    fake.run_info = SimpleNamespace(
        base_model="Qwen/Qwen3-4B-Instruct-2507", user_metadata={"renderer": "qwen3_instruct"}
    )
    tc = await svc.create_training_client_from_state_with_optimizer("tinker://r/weights/step-1")
    assert tc.get_tokenizer() is not None


async def test_no_route_fails_within_the_connect_timeout():
    svc, fake = service(connect_timeout=0.3)
    fake.hang = True  # a connection that never answers
    with pytest.raises(TinkerUnreachable, match="could not reach the Tinker service within 0.3 s"):
        await svc.create_sampling_client(base_model="Qwen/Qwen3-4B-Instruct-2507")
    svc, fake = service(connect_timeout=0.5)
    fake.probe_errors = [
        tinker.APIConnectionError(request=REQ)
    ] * 10_000  # refused, again and again
    with pytest.raises(TinkerUnreachable, match="could not reach the Tinker service"):
        await svc.connect()


# -- threads, TTLs, metadata, close ----------------------------------------------------------------


async def test_client_creation_and_tokenizer_run_off_the_event_loop():
    svc, fake = service()
    loop_thread = threading.current_thread()
    await svc.create_lora_training_client("Qwen/Qwen3-4B-Instruct-2507")
    await svc.create_sampling_client(base_model="Qwen/Qwen3-4B-Instruct-2507")
    assert fake.create_threads and fake.tokenizer_threads
    assert all(t is not loop_thread for t in fake.create_threads + fake.tokenizer_threads)


async def test_periodic_checkpoints_expire_and_the_final_one_stays():
    svc, fake = service(metadata={"stage": "sft", "workspace": "w"})
    tc = await svc.create_lora_training_client("Qwen/Qwen3-4B-Instruct-2507")
    tc.save_state("step-000010").result()
    tc.save_weights_for_sampler("final").result()
    (_, n1, ttl1, meta1), (_, n2, ttl2, _) = fake.saves
    assert (n1, ttl1) == ("step-000010", PERIODIC_TTL_SECONDS)
    assert (n2, ttl2) == ("final", None)
    assert meta1["stage"] == "sft" and meta1["renderer"] == "qwen3_instruct"


async def test_the_session_is_closed_with_the_runs_outcome(ws):
    from engine.pipeline.runner import Runner
    from engine.run.context import StageError
    from engine.run.events import StageFinished

    fakes: list[TinkerService] = []

    def factory(backend, *, checkpoint_dir, env):
        svc, _ = service()
        fakes.append(svc)
        return svc

    async def stage(ctx):
        await ctx.service_client().create_lora_training_client("Qwen/Qwen3-4B-Instruct-2507")
        if ctx.config.sampling.max_tokens == 13:
            raise StageError("no")
        yield StageFinished(stage=ctx.stage)

    runner = Runner(ws, stages={"baseline": SimpleNamespace(run=stage)}, service_factory=factory)
    await runner.run("baseline")
    await runner.run("baseline", ["sampling.max_tokens=13"])
    assert [f._client.closed[0][0] for f in fakes] == ["success", "errored"]
    assert fakes[1]._client.closed[0][1] == "no"


def test_importing_the_tinker_service_needs_no_network():
    assert "engine.backends.tinker_service" in sys.modules


async def test_a_malformed_key_is_an_account_error():
    """The real SDK's own check of the key's form, before anything is sent."""
    env = {"TINKER_API_KEY": "tk-x", "TINKER_BASE_URL": "http://127.0.0.1:9"}
    svc = make_service_client("tinker", env=env, connect_timeout=5)
    with pytest.raises(TinkerAccountError, match="TINKER_API_KEY"):
        await svc.connect()
