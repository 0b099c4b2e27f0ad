"""kill -9 during the reward model's training, then rerun: it resumes from the last checkpoint
and the resumed losses equal an uninterrupted run's (weights, step and Adam state survived)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from conftest import REPO, make_tiny_workspace, needs_backend

from engine.pipeline.runner import Runner, stage_status
from engine.run.events import LogLine, Metric, StageFinished
from engine.store.workspace import Workspace

pytestmark = needs_backend

STEPS = 24
ARGS = [
    f"reward_model.steps={STEPS}",
    "reward_model.batch_size=2",
    "reward_model.rank=4",
    "reward_model.checkpoint_every=3",
    "reward_model.validate=false",
]


def _write_outputs(ws: Workspace) -> None:
    for name, tag in (("baseline_results.json", "base"), ("prompt_engineering_results.json", "p")):
        rows = [
            {"input": d["input"], "expected_output": d["output"], "output": f"{tag} reply {i}"}
            for i, d in enumerate(ws.load_demos())
        ]
        ws.result(name).parent.mkdir(parents=True, exist_ok=True)
        ws.result(name).write_text(json.dumps(rows))


def _losses(events) -> dict[int, float]:
    return {e.step: e.value for e in events if isinstance(e, Metric) and e.name == "train/loss"}


async def test_kill_during_reward_model_training_then_resume(tmp_path: Path):
    ws = make_tiny_workspace(tmp_path / "killed")
    _write_outputs(ws)
    cmd = [sys.executable, "-m", "engine.cli", "-C", str(ws.root), "run", "reward-model"]
    for a in ARGS:
        cmd += ["--set", a]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT
        )
    reg_path = ws.result("checkpoints.toml")
    try:
        while True:  # wait for a state (a checkpoint past step 3), never for a time
            entry = (
                tomllib.loads(reg_path.read_text()).get("reward-model", {})
                if reg_path.exists()
                else {}
            )
            if entry.get("step", 0) >= 3 and not entry.get("finished"):
                break
            assert proc.poll() is None, f"ended before a checkpoint: {log.read_text()[-2000:]}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    entry = tomllib.loads(reg_path.read_text())["reward-model"]
    k = entry["step"]
    if entry.get("finished"):  # the kill landed after the end: nothing to resume
        return
    assert k % 3 == 0 and k < STEPS
    assert {s.name: s for s in stage_status(ws)}["reward-model"].state == "interrupted"

    events = [e async for e in Runner(ws).run_stage("reward-model", ARGS)]
    assert isinstance(events[-1], StageFinished), events[-1]
    assert any(isinstance(e, LogLine) and f"step {k}" in e.message for e in events), [
        e.message for e in events if isinstance(e, LogLine)
    ]
    resumed = _losses(events)
    assert sorted(resumed) == list(range(k + 1, STEPS + 1))

    ref_ws = make_tiny_workspace(tmp_path / "reference")
    _write_outputs(ref_ws)
    ref = _losses([e async for e in Runner(ref_ws).run_stage("reward-model", ARGS)])
    assert all(v == v for v in ref.values()), ref  # no NaN: every row kept its target
    for step in range(k + 1, STEPS + 1):
        assert abs(resumed[step] - ref[step]) < 1e-3 * max(1.0, abs(ref[step])), (
            step,
            resumed[step],
            ref[step],
        )
