"""Runner with fake stages: run folders, events.jsonl, listeners, failures, cancel, replay, status."""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.pipeline.runner import RUNNING_MARKER, Runner, list_runs, load_run_events, stage_status
from engine.run.context import StageContext, StageError
from engine.run.events import (
    LogLine,
    Metric,
    Progress,
    StageFailed,
    StageFinished,
    StageStarted,
    event_to_dict,
)
from engine.store.workspace import Workspace


@dataclass(frozen=True)
class Spec:
    run: Any
    trains: bool = False


async def ok_stage(ctx: StageContext):
    yield LogLine(f"model {ctx.model('policy')}")
    for i in range(3):
        yield Metric("train/loss", i + 1, 1.0 / (i + 1))
        yield Progress(i + 1, 3)
    yield StageFinished(stage=ctx.stage, outputs=("results/x.json",), summary="3 steps")


async def crash_stage(ctx: StageContext):
    yield LogLine("about to crash")
    raise RuntimeError("boom")


async def bad_input_stage(ctx: StageContext):
    ctx.workspace.load_demos()
    yield LogLine("unreachable")


async def slow_stage(ctx: StageContext):
    for i in range(1000):
        ctx.check_cancel()
        await asyncio.sleep(0.01)
        yield Progress(i + 1, 1000)
    yield StageFinished(stage=ctx.stage)


async def failing_stage(ctx: StageContext):
    yield LogLine("x")
    raise StageError("Do this to fix it.")


def make_runner(ws: Workspace, **stages: Any) -> Runner:
    return Runner(ws, stages={k.replace("_", "-"): Spec(v) for k, v in stages.items()})


async def test_run_writes_events_config_and_notifies(ws: Workspace):
    ws.env_path.write_text("TINKER_API_KEY=tk-very-secret-1\n")
    seen = []

    async def alistener(ev):
        seen.append(("async", type(ev).__name__))

    runner = make_runner(ws, baseline=ok_stage)
    runner.add_listener(lambda ev: seen.append(("sync", type(ev).__name__)))
    runner.add_listener(alistener)
    events = [ev async for ev in runner.run_stage("baseline", ["sampling.max_tokens=7"])]
    assert isinstance(events[0], StageStarted) and isinstance(events[-1], StageFinished)
    assert events[-1].summary == "3 steps"
    assert [e.value for e in events if isinstance(e, Metric)] == [1.0, 0.5, 1.0 / 3]
    assert ("sync", "StageFinished") in seen and ("async", "StageStarted") in seen
    (run,) = list_runs(ws, "baseline")
    assert run.name.startswith("baseline-2") and events[0].run_dir == str(run)
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["sampling"]["max_tokens"] == 7
    lines = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [x["type"] for x in lines] == [type(e).__name__ for e in events]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (run / RUNNING_MARKER).exists()
    for p in run.rglob("*"):
        if p.is_file():
            assert "tk-very-secret-1" not in p.read_text()
    # replay gives the same events
    assert [event_to_dict(e) for e in load_run_events(run)] == [event_to_dict(e) for e in events]


async def test_crash_becomes_actionable_failure(ws: Workspace):
    final = await make_runner(ws, baseline=crash_stage).run("baseline")
    assert isinstance(final, StageFailed) and not final.cancelled
    assert "RuntimeError: boom" in final.message and "events.jsonl" in final.message
    (run,) = list_runs(ws, "baseline")
    events = load_run_events(run)
    assert any(
        isinstance(e, LogLine) and e.level == "error" and "Traceback" in e.message for e in events
    )
    st = {s.name: s for s in stage_status(ws)}
    assert st["baseline"].state == "failed" and "boom" in st["baseline"].message


async def test_workspace_errors_pass_through(ws: Workspace):
    ws.demos_path.write_text("[{}]")
    final = await make_runner(ws, demos=bad_input_stage).run("demos")
    assert isinstance(final, StageFailed)
    assert final.message.startswith("data/data.json: entry 1: missing field")
    final = await make_runner(ws, prompting=failing_stage).run("prompting")
    assert final.message == "Do this to fix it."


async def test_cancel_stops_quickly(ws: Workspace):
    runner = make_runner(ws, baseline=slow_stage)
    n = 0
    final = None
    async for ev in runner.run_stage("baseline"):
        if isinstance(ev, Progress):
            n += 1
            if n == 5:
                runner.cancel()
        final = ev
    assert isinstance(final, StageFailed) and final.cancelled
    assert n <= 7
    assert stage_status(ws)[1].state == "cancelled"


async def test_consumer_leaving_stops_the_stage(ws: Workspace):
    runner = make_runner(ws, baseline=slow_stage)
    agen = runner.run_stage("baseline")
    async for ev in agen:
        if isinstance(ev, Progress):
            break
    await agen.aclose()
    assert runner.running is None
    (run,) = list_runs(ws, "baseline")
    assert not (run / RUNNING_MARKER).exists()


async def test_unknown_and_unimplemented_and_bad_override(ws: Workspace):
    r = Runner(ws)
    final = await r.run("nope")
    assert (
        isinstance(final, StageFailed)
        and "Unknown stage 'nope'" in final.message
        and "baseline" in final.message
    )
    final = await Runner(ws, stages={"later": Spec(None)}).run("later")
    assert "not implemented yet" in final.message
    final = await make_runner(ws, baseline=ok_stage).run("baseline", ['backend.name="gpu"'])
    assert isinstance(final, StageFailed) and "backend.name" in final.message


def test_status_lists_every_stage_and_interrupted_runs(ws: Workspace):
    st = stage_status(ws)
    assert [s.name for s in st] == [
        "demos",
        "baseline",
        "prompting",
        "synth-inputs",
        "synth-outputs",
        "sft",
        "reward-model",
        "rl-prompts",
        "rlaif",
        "ditto",
        "evaluate",
    ]
    assert st[0].state == "done" and st[0].outputs == ["data/data.json"]
    assert st[1].state == "not run"
    assert all(s.state in ("not run", "not implemented") for s in st[1:])
    # a killed run: events without an end, a marker naming a dead process
    run = ws.runs_dir / "sft-20240101-000000"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text(
        json.dumps(event_to_dict(StageStarted("sft"))) + '\n{"type": "Metr'
    )
    (run / RUNNING_MARKER).write_text(json.dumps({"pid": 999999999}))
    sft = {s.name: s for s in stage_status(ws)}["sft"]
    assert sft.state == "interrupted" and "resume" in sft.message
    started, note = load_run_events(run)  # the torn last line is named, not replayed
    assert isinstance(started, StageStarted) and "line 2 is cut off" in note.message


async def test_one_stage_at_a_time(ws: Workspace):
    runner = make_runner(ws, baseline=slow_stage, prompting=ok_stage)
    agen = runner.run_stage("baseline")
    await agen.__anext__()
    final = await runner.run("prompting")
    assert isinstance(final, StageFailed) and "baseline is still running" in final.message
    runner.cancel()
    rest = [e async for e in agen]
    assert isinstance(rest[-1], StageFailed) and rest[-1].cancelled
    assert isinstance(await runner.run("prompting"), StageFinished)


def test_last_run_event_reads_from_the_end(tmp_path):
    from engine.pipeline.runner import last_run_event

    run = tmp_path / "run"
    run.mkdir()
    assert last_run_event(run) is None
    lines = [json.dumps(event_to_dict(Metric("train/loss", i, 1.0 / (i + 1)))) for i in range(50)]
    long_line = json.dumps(event_to_dict(LogLine("x" * 5000)))
    text = "\n".join([*lines, long_line, "", "not json", '{"type": "Metr'])  # torn tail
    (run / "events.jsonl").write_text(text)
    *_, last, not_json, torn = load_run_events(run)  # the two bad lines become notes
    assert "line 53 cannot be read" in not_json.message and "line 54 is cut off" in torn.message
    for block in (7, 64, 4096, 65536):  # block edges inside lines, and a line longer than a block
        assert last_run_event(run, block=block) == last
    (run / "events.jsonl").write_text(lines[0])
    assert last_run_event(run, block=5) == load_run_events(run)[0]


# -- the runner's rooms: preflight, recorder, driver ----


async def test_a_broken_listener_becomes_a_log_line_on_screen(ws: Workspace):
    seen: list = []

    def broken(ev):
        if isinstance(ev, StageStarted):
            raise ValueError("chart exploded")

    runner = make_runner(ws, baseline=ok_stage)
    runner.add_listener(broken)
    runner.add_listener(seen.append)
    events = [ev async for ev in runner.run_stage("baseline")]
    warning = "listener error (test_a_broken_listener_becomes_a_log_line_on_screen.<locals>.broken): chart exploded"
    for stream in (events, seen):  # the caller's stream and the other listeners both get it
        assert any(isinstance(e, LogLine) and e.message == warning for e in stream)
    assert isinstance(events[-1], StageFinished)


class ClosingService:
    def __init__(self):
        self.closed: list = []

    def __call__(self, backend, *, checkpoint_dir, env):
        return self

    def close(self, status, detail=None):
        self.closed.append((status, detail))


async def _uses_service(ctx: StageContext):
    ctx.service_client()
    yield LogLine("got a client")
    if ctx.config.sampling.max_tokens == 13:
        raise StageError("bad thing")
    if ctx.config.sampling.max_tokens == 14:
        while not ctx.cancel_event.is_set():  # wait for the state, not for a time
            await asyncio.sleep(0.001)
    ctx.check_cancel()
    yield StageFinished(stage=ctx.stage)


async def test_service_closed_with_the_real_outcome(ws: Workspace):
    svc = ClosingService()
    runner = Runner(ws, stages={"baseline": Spec(_uses_service)}, service_factory=svc)
    await runner.run("baseline")
    await runner.run("baseline", ["sampling.max_tokens=13"])
    events = []
    async for ev in runner.run_stage("baseline", ["sampling.max_tokens=14"]):
        if isinstance(ev, LogLine) and ev.message == "got a client":
            runner.cancel()
        events.append(ev)
    assert [s for s, _ in svc.closed] == ["success", "errored", "interrupted"]
    assert svc.closed[1][1] == "bad thing"


async def test_missing_inputs_refused_before_a_run_folder(ws: Workspace):
    final = await make_runner(ws, sft=ok_stage).run("sft")
    assert isinstance(final, StageFailed)
    assert "results/synthetic_personalized_data.jsonl not found" in final.message
    assert "persona run synth-outputs" in final.message
    assert list_runs(ws) == []
    assert not ws.runs_dir.exists() or not any(ws.runs_dir.iterdir())


def _fake_run(ws: Workspace, stage: str, marker: dict) -> Any:
    run = ws.runs_dir / f"{stage}-20240101-000000"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text(
        json.dumps(event_to_dict(StageStarted(stage=stage, run_dir=str(run)))) + "\n"
    )
    (run / RUNNING_MARKER).write_text(json.dumps(marker))
    return run


async def test_stale_running_marker_neither_blocks_nor_misleads(ws: Workspace):
    import os
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    _fake_run(ws, "baseline", {"pid": int(dead.stdout), "pid_started": 1.0, "stage": "baseline"})
    st = {s.name: s for s in stage_status(ws)}
    assert st["baseline"].state == "interrupted"
    # a live pid that is another process now (its start time differs from the marker's)
    parent = os.getppid()
    run = ws.runs_dir / "baseline-20240101-000000"
    (run / RUNNING_MARKER).write_text(json.dumps({"pid": parent, "pid_started": 1.0}))
    assert stage_status(ws)[1].state == "interrupted"
    final = await make_runner(ws, baseline=ok_stage).run("baseline")
    assert isinstance(final, StageFinished)


async def test_a_live_marker_from_another_process_blocks(ws: Workspace):
    import subprocess
    import sys

    import psutil

    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        started = psutil.Process(child.pid).create_time()
        _fake_run(ws, "baseline", {"pid": child.pid, "pid_started": started})
        final = await make_runner(ws, baseline=ok_stage).run("baseline")
        assert isinstance(final, StageFailed) and "already running" in final.message
        assert {s.name: s for s in stage_status(ws)}["baseline"].state == "running"
    finally:
        child.stdin.close()
        child.wait()


def test_demos_status_is_the_file_now(ws: Workspace):
    from engine.pipeline.runner import run_state  # noqa: F401 - the old per-run state stays available

    good = ws.demos_path.read_text()
    ws.demos_path.write_text("[{}]")
    st = stage_status(ws)[0]
    assert st.state == "failed" and st.outputs == [] and "entry 1" in st.message
    _fake_run(ws, "demos", {"pid": 0})  # an old failed/interrupted run does not stick
    ws.demos_path.write_text(good)
    st = stage_status(ws)[0]
    assert st.state == "done" and st.message == "" and st.outputs == ["data/data.json"]


async def _checkpointing_stage(ctx: StageContext):
    from engine.run.events import CheckpointSaved

    base = ctx.checkpoint_dir / "model-1"
    for step in range(1, 6):
        for kind in ("weights", "sampler_weights"):
            (base / kind / f"step-{step:06d}").mkdir(parents=True)
            (base / kind / f"step-{step:06d}" / "adapter.bin").write_bytes(b"x" * 100)
        yield CheckpointSaved(name=f"step-{step:06d}", step=step)
    for kind in ("weights", "sampler_weights"):
        (base / kind / "final").mkdir(parents=True)
    yield CheckpointSaved(name="final", step=6)
    yield StageFinished(stage=ctx.stage)


async def test_checkpoint_retention_keeps_last_n_and_final(ws: Workspace):
    runner = Runner(ws, stages={"sft": Spec(_checkpointing_stage, trains=True)})
    ws.result("synthetic_personalized_data.jsonl").parent.mkdir(exist_ok=True)
    ws.result("synthetic_personalized_data.jsonl").write_text("")
    final = await runner.run("sft", ["runs.keep_checkpoints=2"])
    assert isinstance(final, StageFinished)
    (run,) = list_runs(ws, "sft")
    for kind in ("weights", "sampler_weights"):
        left = sorted(p.name for p in (run / "checkpoints" / "model-1" / kind).iterdir())
        assert left == ["final", "step-000004", "step-000005"]
    st = {s.name: s for s in stage_status(ws)}["sft"]
    assert st.disk_bytes >= 400


def test_retention_keeps_what_the_registry_names_as_local_uris(tmp_path: Path):
    """The local backend records checkpoints as local:///… addresses: a periodic checkpoint
    the registry names (e.g. DITTO's frozen reference) must survive pruning."""
    from engine.store.checkpoint_retention import prune_checkpoints

    kind = tmp_path / "checkpoints" / "model-1" / "sampler_weights"
    for i, name in enumerate(("sft-init", "round-1", "round-2", "round-3", "final")):
        (kind / name).mkdir(parents=True)
        os.utime(kind / name, (1000 + i, 1000 + i))
    removed = prune_checkpoints(
        tmp_path / "checkpoints", 1, [f"local://{kind / 'sft-init'}", "tinker://x/y"]
    )
    assert sorted(p.name for p in removed) == ["round-1", "round-2"]
    assert sorted(p.name for p in kind.iterdir()) == ["final", "round-3", "sft-init"]
