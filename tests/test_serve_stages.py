"""The project's own Tinker path end to end against `persona serve`: stages run
with ``--backend tinker`` and ``TINKER_BASE_URL`` in the workspace's .env, on the tiny model,
give the in-process local backend's losses; a server killed mid-run is reported within
``backend.connect_timeout`` and a rerun against the restarted server resumes."""

from __future__ import annotations

import asyncio
import json
import math
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY, make_tiny_workspace, needs_backend
from test_stage_ditto import ARGS as DITTO_ARGS
from test_stage_evaluate import _write_synth
from test_stage_reward_model import RM_TOML, _write_outputs
from test_stage_rlaif import RULE_TOML, _write_prompts
from test_stage_sft import ARGS as SFT_ARGS
from test_stage_sft import write_data

from engine.backends.renderers import renderer_name_for
from engine.pipeline.runner import Runner
from engine.run.events import CheckpointSaved, LogLine, Metric, StageFailed, StageFinished
from engine.serve.server import ServerThread
from engine.serve.state import ServedState
from engine.store.workspace import Workspace

pytestmark = needs_backend
KEY = "tml-" + "s" * 40


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from engine.backends.local import LocalServiceClient

    # The served service and the in-process runs compute with the same thread count whatever
    # the machine's load (left automatic, each picks it from the load when it starts): the
    # count sets the order of float sums, and the comparisons below are exact to rounding.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERSONA_THREADS", "1")
        svc = LocalServiceClient(checkpoint_dir=tmp_path_factory.mktemp("served"))
        yield svc
        svc.close()


@pytest.fixture(scope="module")
def server(service) -> Iterator[ServerThread]:
    srv = ServerThread(ServedState(service), KEY).start()
    yield srv
    srv.stop()


def remote(ws: Workspace, url: str) -> Workspace:
    """The workspace as a person on another machine sets it up: the key and URL in .env."""
    (ws.root / ".env").write_text(f"TINKER_API_KEY={KEY}\nTINKER_BASE_URL={url}\n")
    return ws


def metrics(events, prefix: str = "") -> dict[tuple[str, int], float]:
    return {
        (e.name, e.step): e.value
        for e in events
        if isinstance(e, Metric) and e.name.startswith(prefix) and "time" not in e.name
    }


async def both(tmp_path: Path, server: ServerThread, prepare, stage: str, args: list[str]):
    """The stage's events on the server (tinker backend) and in process (local backend)."""
    out = []
    for name, backend in (("remote", "tinker"), ("local", None)):
        ws = make_tiny_workspace(tmp_path / name)
        prepare(ws)
        if backend:
            remote(ws, server.base_url)
        out.append([e async for e in Runner(ws).run_stage(stage, args, backend=backend)])
    for events in out:
        assert isinstance(events[-1], StageFinished), events[-1]
    return out


def assert_same(got: dict, want: dict, rel: float = 1e-4, abs_: float = 1e-5) -> None:
    assert got.keys() == want.keys() and got
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=rel, abs_tol=abs_), (k, got[k], want[k])


async def test_sft_over_the_server_gives_the_local_losses(tmp_path, server, service):
    got, want = await both(tmp_path, server, write_data, "sft", ["sft.steps=4", *SFT_ARGS])
    assert_same(metrics(got, "train/"), metrics(want, "train/"))
    assert_same(metrics(got, "val/"), metrics(want, "val/"))
    saved = [e.sampler_path for e in got if isinstance(e, CheckpointSaved)]
    assert saved and all(p.startswith("tinker://") for p in saved)
    run = saved[-1].removeprefix("tinker://").split("/")[0]
    assert (Path(service.checkpoint_dir) / run).is_dir()  # under the server's root
    # the session and the training run carry the run's name and metadata; the session
    # was finished with the run's outcome
    (session,) = [s for s in server.state.sessions.values() if s.display_name.endswith(" remote")]
    assert session.display_name == "persona sft remote" and session.finished == "success"
    assert session.user_metadata["stage"] == "sft" and session.user_metadata["run"]
    meta = server.state.training_run(run).user_metadata
    assert meta["stage"] == "sft" and meta["renderer"] == renderer_name_for(TINY)


async def test_reward_model_over_the_server_gives_the_local_losses(tmp_path, server):
    def prepare(ws: Workspace) -> None:
        ws.config_path.write_text(ws.config_path.read_text() + RM_TOML)
        _write_outputs(ws, "baseline_results.json", "baseline")
        _write_outputs(ws, "prompt_engineering_results.json", "prompted")
        _write_outputs(ws, "sft_model_outputs.json", "sft")

    # verdict mode on both (its auto setting means feedback on Tinker, verdict locally)
    # at the old lr: the local default (5e-4) lets float rounding between the wire and the
    # process grow past the tolerance within two steps
    args = [
        "reward_model.mode=verdict", "reward_model.steps=2", "reward_model.lr=1e-4",
        "reward_model.validate=false",
    ]  # fmt: skip
    got, want = await both(tmp_path, server, prepare, "reward-model", args)
    assert_same(metrics(got, "train/"), metrics(want, "train/"))


async def test_ditto_over_the_server_gives_the_local_losses(tmp_path, server):
    args = [*DITTO_ARGS, "ditto.rounds=1", "ditto.sft_max_steps=2"]
    got, want = await both(tmp_path, server, lambda ws: None, "ditto", args)
    assert_same(metrics(got, "ditto/sft"), metrics(want, "ditto/sft"))
    # DPO runs forward_backward_custom: on the wire a forward pass, the loss's gradient taken
    # on the client, then a backward pass with it as weights; in process one graph. The same
    # gradients, summed in another order: equal to float rounding, which the steps compound.
    assert_same(metrics(got, "ditto/"), metrics(want, "ditto/"), rel=2e-3, abs_=2e-3)


async def test_rlaif_over_the_server_gives_the_local_rewards(tmp_path, server):
    def prepare(ws: Workspace) -> None:
        toml = RULE_TOML.format(steps=2, lr=0.05, ckpt=0) + "seed = 1\n"
        ws.config_path.write_text(ws.config_path.read_text() + toml)
        _write_prompts(ws)

    got, want = await both(tmp_path, server, prepare, "rlaif", [])
    assert_same(metrics(got, "rl/"), metrics(want, "rl/"))


async def test_evaluate_over_the_server(tmp_path, server):
    ws = remote(make_tiny_workspace(tmp_path / "ws"), server.base_url)
    _write_synth(ws)
    sft = await Runner(ws).run("sft", ["sft.steps=1", "sft.sample_after=false"], backend="tinker")
    assert isinstance(sft, StageFinished), sft
    quick = ["evaluate.samples=1", "evaluate.max_tokens=6", "evaluate.dev_prompts=0"]
    final = await Runner(ws).run("evaluate", [*quick, "reward_model.mode=verdict"], "tinker")
    assert isinstance(final, StageFinished), final
    data = json.loads(ws.result("evaluation.json").read_text())
    assert [m["name"] for m in data["methods"]] == ["baseline", "prompting", "few-shot", "sft"]
    assert all(data["metrics"][m["name"]]["nll"]["mean"] > 0 for m in data["methods"])


def _registered_step(ws: Workspace) -> int:
    path = ws.result("checkpoints.toml")
    if not path.exists():
        return 0
    return int(tomllib.loads(path.read_text()).get("sft", {}).get("step", 0))


async def test_a_killed_server_is_reported_in_time_and_a_rerun_resumes(tmp_path, service):
    first = ServerThread(ServedState(service), KEY).start()
    ws = remote(make_tiny_workspace(tmp_path / "ws"), first.base_url)
    write_data(ws)
    timeout = 2.0
    args = [*SFT_ARGS, f"backend.connect_timeout={timeout}", "sft.checkpoint_every=2"]
    run = asyncio.ensure_future(Runner(ws).run("sft", ["sft.steps=400", *args], backend="tinker"))
    deadline = time.monotonic() + 120
    while _registered_step(ws) < 2:  # a state: the first checkpoint is on record
        assert not run.done() and time.monotonic() < deadline, run
        await asyncio.sleep(0.05)
    first.stop()  # killed mid-run: every connection dropped
    killed = time.monotonic()
    final = await asyncio.wait_for(run, 60)
    waited = time.monotonic() - killed
    assert isinstance(final, StageFailed) and "lost the Tinker service" in final.message, final
    assert waited < timeout + 3.0, waited  # the probe's own slack, on a shared machine
    k = _registered_step(ws)
    assert k >= 2 and k % 2 == 0

    again = ServerThread(ServedState(service), KEY, port=first.port).start()  # restarted
    try:
        events = [
            e async for e in Runner(ws).run_stage("sft", [f"sft.steps={k + 2}", *args], "tinker")
        ]
    finally:
        again.stop()
    assert isinstance(events[-1], StageFinished), events[-1]
    assert any(
        isinstance(e, LogLine) and e.message.startswith(f"resuming from step {k}") for e in events
    )
    assert sorted(s for (n, s) in metrics(events, "train/loss")) == [k + 1, k + 2]
