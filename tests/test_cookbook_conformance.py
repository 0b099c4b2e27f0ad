"""tinker-cookbook's own training loops, unchanged, against the local service.

The cookbook (``tinker_cookbook`` 0.5.8) looks ``tinker.ServiceClient`` up when a loop
starts, so each test points it at the local service and runs the cookbook's supervised,
DPO and RL ``main`` for a few steps on the tiny random model, twice: in process
(``LocalServiceClient``) and served (the real SDK's ``ServiceClient`` talking HTTP to
`persona serve` on 127.0.0.1). Every other socket is closed: nothing may reach the network
or the Hugging Face hub.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TINY, needs_backend

pytestmark = needs_backend

tinker = pytest.importorskip("tinker")
chz = pytest.importorskip("chz")
pytest.importorskip("tinker_cookbook")

from tinker_cookbook.rl.types import (  # noqa: E402
    Env,
    EnvGroupBuilder,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
)

# ---- fixtures -------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVE_KEY = "tml-" + "c" * 40


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any TCP/UDP connection attempt fails the test at once."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def loopback(address: Any) -> bool:
        host = address[0] if isinstance(address, tuple) else address
        return host in LOOPBACK

    def connect(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_UNIX or loopback(address):
            return real_connect(self, address)
        refuse(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family == socket.AF_UNIX or loopback(address):
            return real_connect_ex(self, address)
        refuse(self, address)
        return 1

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if loopback(host):
            return real_getaddrinfo(host, *args, **kwargs)
        refuse(None, host)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    from engine.backends.local.models import ensure_model_dir

    return str(ensure_model_dir(TINY))


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One local service for the module, so the tiny model loads once."""
    from engine.backends.local import LocalServiceClient

    # CPU float32: the same arithmetic on every machine (the default picks bf16 or CUDA).
    service = LocalServiceClient(
        checkpoint_dir=tmp_path_factory.mktemp("checkpoints"), device="cpu", dtype="float32"
    )
    yield service
    service.close()


@pytest.fixture(params=["in_process", "served"])
def local_service(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    shared_service: Any,
    tiny_dir: str,
    no_network: None,
) -> Iterator[list[dict[str, Any]]]:
    """``tinker.ServiceClient(...)`` returns the local service, in process or the real SDK's
    client of `persona serve` on 127.0.0.1; the list records each call's kwargs."""
    import engine.backends.renderers  # noqa: F401 - registers "persona/smollm2"
    from engine.backends.local.models import REGISTERED_MODELS
    from engine.serve.server import ServerThread
    from engine.serve.state import ServedState

    torch.manual_seed(0)  # the loops create LoRA clients without a seed: init from torch's RNG
    calls: list[dict[str, Any]] = []
    server = None
    if request.param == "served":
        state = ServedState(shared_service, models=(*REGISTERED_MODELS, tiny_dir))
        server = ServerThread(state, SERVE_KEY).start()
    real_client = tinker.ServiceClient

    def factory(**kwargs: Any) -> Any:
        calls.append(kwargs)
        if server is None:
            return shared_service
        return real_client(**{**kwargs, "base_url": server.base_url, "api_key": SERVE_KEY})

    monkeypatch.setattr(tinker, "ServiceClient", factory)
    yield calls
    if server is not None:
        server.stop()


def read_metrics(log_path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, one row per step in the order the loop logged them.

    (Not keyed on the rows' "step": the loops merge optim_step's metrics into the row
    after setting it, and the local backend's optim_step reports its own "step".)
    """
    text = (log_path / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHATS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
]


# ---- supervised -----------------------------------------------------------------------


def test_supervised_train_loss_falls(
    local_service: list[dict[str, Any]], shared_service: Any, tiny_dir: str, tmp_path: Path
) -> None:
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    from engine.backends.renderers import SMOLLM2_RENDERER

    steps = 5
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS * steps])
    log_path = tmp_path / "sft"
    config = train.Config(
        log_path=str(log_path),
        model_name=tiny_dir,
        recipe_name="persona_conformance_sft",
        renderer_name=SMOLLM2_RENDERER,
        dataset_builder=FromConversationFileBuilder(
            file_path=data,
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=tiny_dir,
                renderer_name=SMOLLM2_RENDERER,
                max_length=128,
                batch_size=len(CHATS),
            ),
        ),
        learning_rate=5e-3,  # explicit, so hyperparam_utils.get_lr is never consulted
        lr_schedule="constant",
        lora_rank=8,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
        max_steps=steps,
    )
    asyncio.run(train.main(config))

    assert [c["user_metadata"]["recipe_name"] for c in local_service] == ["persona_conformance_sft"]
    rows = read_metrics(log_path)
    losses = [r["train_mean_nll"] for r in rows]
    assert len(losses) == steps
    assert all(math.isfinite(x) for x in losses)
    assert all(r["num_sequences"] == len(CHATS) for r in rows)
    assert losses[-1] < losses[0] - 1.0, losses
    # The loop's final checkpoint is one the service can resume from.
    final = json.loads((log_path / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert final["name"] == "final" and final["state_path"] and final["sampler_path"]
    resumed = (
        tinker.ServiceClient()
        .create_training_client_from_state_with_optimizer(final["state_path"])
        .result()
    )
    assert resumed.get_info().lora_rank == 8


# ---- DPO ------------------------------------------------------------------------------


def comparison(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "comparison": {
            "prompt_conversation": [{"role": "user", "content": prompt}],
            "completion_A": [{"role": "assistant", "content": chosen}],
            "completion_B": [{"role": "assistant", "content": rejected}],
        },
        "label": "A",
    }


PAIRS = [
    comparison("Name a colour.", "Blue.", "I would rather not say."),
    comparison("Say hi.", "Hi there!", "No."),
    comparison("Two plus two?", "Four.", "Five, probably."),
]


def test_dpo_loss_falls(local_service: list[dict[str, Any]], tiny_dir: str, tmp_path: Path) -> None:
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    from engine.backends.renderers import SMOLLM2_RENDERER

    steps = 4
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * steps)
    log_path = tmp_path / "dpo"
    config = train_dpo.Config(
        log_path=str(log_path),
        model_name=tiny_dir,
        recipe_name="persona_conformance_dpo",
        renderer_name=SMOLLM2_RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            comparison_builder=ComparisonBuilderFromJsonl(train_path=data),
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=tiny_dir,
                renderer_name=SMOLLM2_RENDERER,
                max_length=128,
                batch_size=len(PAIRS),
            ),
        ),
        learning_rate=5e-3,
        lr_schedule="constant",
        dpo_beta=0.5,
        lora_rank=8,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
        max_steps=steps,
    )
    train_dpo.main(config)  # synchronous: it runs its own event loops

    rows = read_metrics(log_path)
    losses = [r["dpo_loss"] for r in rows]
    margins = [r["margin"] for r in rows]
    assert len(losses) == steps
    assert all(math.isfinite(x) for x in losses + margins)
    # Step 0 runs on the reference weights themselves: loss log 2, margin 0.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert margins[0] == pytest.approx(0.0, abs=1e-3)
    assert losses[-1] < losses[0] - 0.2, losses
    assert margins[-1] > margins[0] + 0.2, margins
    assert rows[-1]["accuracy"] == 1.0


# ---- RL -------------------------------------------------------------------------------


class FirstTokenEnv(Env):  # type: ignore[misc, valid-type]
    """One turn: reward 1 when the reply's first token is ``target``."""

    def __init__(self, prompt: Any, target: int, stop: list[int]) -> None:
        self.prompt, self.target, self.stop = prompt, target, stop

    async def initial_observation(self) -> tuple[Any, list[int]]:
        return self.prompt, self.stop

    async def step(self, action: list[int], *, extra: Any = None) -> Any:
        hit = float(action[:1] == [self.target])
        return StepResult(
            reward=hit,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.stop,
            metrics={"hit": hit},
        )


class FirstTokenGroup(EnvGroupBuilder):  # type: ignore[misc, valid-type]
    def __init__(self, prompt: Any, target: int, stop: list[int], size: int) -> None:
        self.prompt, self.target, self.stop, self.size = prompt, target, stop, size

    async def make_envs(self) -> Sequence[Any]:
        return [FirstTokenEnv(self.prompt, self.target, self.stop) for _ in range(self.size)]

    def logging_tags(self) -> list[str]:
        return ["first_token"]


class FirstTokenDataset(RLDataset):  # type: ignore[misc, valid-type]
    def __init__(self, groups: list[Any], n_batches: int) -> None:
        self.groups, self.n_batches = groups, n_batches

    def get_batch(self, index: int) -> Sequence[Any]:
        return self.groups

    def __len__(self) -> int:
        return self.n_batches


@chz.chz
class FirstTokenDatasetBuilder(RLDatasetBuilder):  # type: ignore[misc, valid-type]
    """Every batch: the same prompts, each answered by a group of ``group_size`` rollouts."""

    model_dir: str
    renderer_name: str
    target_text: str
    prompts: tuple[str, ...]
    group_size: int
    n_batches: int

    async def __call__(self) -> tuple[Any, None]:
        from tinker_cookbook import renderers
        from tinker_cookbook.tokenizer_utils import get_tokenizer

        tokenizer = get_tokenizer(self.model_dir)
        renderer = renderers.get_renderer(self.renderer_name, tokenizer)
        (target,) = tokenizer.encode(self.target_text, add_special_tokens=False)
        stop = renderer.get_stop_sequences()
        groups = [
            FirstTokenGroup(
                renderer.build_generation_prompt([{"role": "user", "content": p}]),
                target,
                stop,
                self.group_size,
            )
            for p in self.prompts
        ]
        return FirstTokenDataset(groups, self.n_batches), None


def test_rl_reward_rises(
    local_service: list[dict[str, Any]],
    tiny_dir: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tinker_cookbook.rl import train as rl_train

    import engine.backends.local.service as local_service_module
    from engine.backends.renderers import SMOLLM2_RENDERER

    # The cookbook sends no sampling seeds: draw them from a fixed sequence instead of the
    # OS, so the rollouts (and the test's outcome) are the same on every run.
    seeds = itertools.count(1)
    monkeypatch.setattr(
        local_service_module,
        "make_generator",
        lambda seed: torch.Generator().manual_seed(next(seeds) if seed is None else seed),
    )

    steps = 5
    log_path = tmp_path / "rl"
    config = rl_train.Config(
        log_path=str(log_path),
        model_name=tiny_dir,
        recipe_name="persona_conformance_rl",
        renderer_name=SMOLLM2_RENDERER,
        dataset_builder=FirstTokenDatasetBuilder(
            model_dir=tiny_dir,
            renderer_name=SMOLLM2_RENDERER,
            target_text="\n",
            prompts=("Go.", "Say a word."),
            group_size=8,
            n_batches=steps,
        ),
        learning_rate=3e-3,  # 1e-2 overshoots: at T=0.1 small logit noise moves a lot of mass
        max_tokens=1,
        # The tiny model is random: at T=1 its next token is near-uniform over 49k ids. At
        # T=0.1 "\n" (a copy of the prompt's last token) takes about a third of the mass and
        # the rest spreads thin: a bandit that policy gradient learns in a few steps.
        temperature=0.1,
        lora_rank=8,
        save_every=0,
        eval_every=0,
        num_groups_to_log=0,
        rollout_json_export=False,
        max_steps=steps,
    )
    asyncio.run(rl_train.main(config))

    rows = read_metrics(log_path)
    assert len(rows) == steps
    rewards = [r["env/all/reward/total"] for r in rows]
    assert all(0.0 <= x <= 1.0 for x in rewards)
    for key in ("optim/entropy", "optim/kl_sample_train_v1"):
        assert all(math.isfinite(r[key]) for r in rows), key
    # On-policy: the sampler's logprobs match the trainer's.
    assert all(abs(r["optim/kl_sample_train_v1"]) < 1e-3 for r in rows)
    assert 0.1 < rewards[0] < 0.7, rewards
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.25, rewards
