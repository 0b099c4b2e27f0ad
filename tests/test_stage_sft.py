"""SFT: row selection, kill -9 mid-training then resume (step count and optimizer state intact)."""

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

from engine.pipeline.runner import Runner, list_runs, stage_status
from engine.run.events import LogLine, Metric, StageFailed, StageFinished
from engine.stages.sft import select_rows
from engine.store.workspace import Workspace

ROWS = [
    (
        "Email Sam about the racks due Fri 5/2.",
        "Hi Sam —\n\nCan you order two racks by Fri 5/2?\n\nThanks!\n— Maya",
    ),
    (
        "Ask Prof. Kim for a letter by 10/15.",
        "Hi Prof. Kim —\n\nWould you write my NSF letter? Due Tue 10/15.\n\nThanks!\n— Maya",
    ),
    (
        "Tell Lena the hood in 310 beeps.",
        "Hi Lena —\n\nThe fume hood in 310 has beeped since Mon.\n\nThanks!\n— Maya",
    ),
    (
        "Ask Dr. Patel about my 3/12 bill.",
        "Hi Dr. Patel —\n\nWas my Wed 3/12 visit billed to Delta?\n\nThanks!\n— Maya",
    ),
    (
        "Invite the lab to lunch Thu 6/5.",
        "Hi all —\n\nLunch on me, Thu 6/5 at noon.\n\nThanks!\n— Maya",
    ),
    (
        "Decline Jordan's panel on 4/17.",
        "Hi Jordan —\n\nI have to say no to the 4/17 panel.\n\nThanks!\n— Maya",
    ),
]
ARGS = [
    "sft.lr=0.02",
    "sft.checkpoint_every=3",
    "sft.eval_every=1000",
    "sft.sample_after=false",
    "sft.batch_size=2",
    "sft.val_fraction=0.2",
]


def write_data(ws: Workspace) -> None:
    rows = [
        {
            "id": f"in-{i}",
            "seed": "s",
            "status": "accepted",
            "messages": [
                {"role": "system", "content": "Be Maya."},
                {"role": "user", "content": a},
                {"role": "assistant", "content": b},
            ],
        }
        for i, (a, b) in enumerate(ROWS)
    ]
    ws.result("synthetic_personalized_data.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )


def test_select_rows():
    rows = [{"status": s} for s in ("pending", "accepted", "edited", "rejected", "pending")]
    sel, how = select_rows(rows, "auto")
    assert len(sel) == 2 and "accepted/edited" in how
    sel, how = select_rows([{"status": "pending"}, {"status": "rejected"}], "auto")
    assert len(sel) == 1 and how.startswith("no rows reviewed yet")
    assert len(select_rows(rows, "non-rejected")[0]) == 4
    assert len(select_rows([{"status": "pending"}], "reviewed")[0]) == 0


@needs_backend
async def test_sft_without_rows_fails_clearly(ws: Workspace):
    final = await Runner(ws).run("sft")
    assert (
        isinstance(final, StageFailed)
        and "synthetic_personalized_data.jsonl not found" in final.message
    )
    write_data(ws)
    lines = (
        ws.result("synthetic_personalized_data.jsonl")
        .read_text()
        .replace('"accepted"', '"pending"')
    )
    ws.result("synthetic_personalized_data.jsonl").write_text(lines)
    final = await Runner(ws).run("sft", ['sft.train_on="reviewed"'])
    assert isinstance(final, StageFailed) and "No training rows" in final.message


def _losses(events) -> dict[int, float]:
    return {e.step: e.value for e in events if isinstance(e, Metric) and e.name == "train/loss"}


@needs_backend
async def test_kill_during_sft_then_resume(tmp_path: Path):
    ws = make_tiny_workspace(tmp_path / "killed")
    write_data(ws)
    # 1. a separate process trains a long run; kill -9 it right after a checkpoint at step >= 3
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "-C",
        str(ws.root),
        "run",
        "sft",
        "--set",
        "sft.steps=400",
    ]
    for a in ARGS:
        cmd += ["--set", a]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    reg_path = ws.result("checkpoints.toml")
    try:
        while True:  # a state (a checkpoint at step >= 3), polled; the process's end fails it
            if (
                reg_path.exists()
                and tomllib.loads(reg_path.read_text()).get("sft", {}).get("step", 0) >= 3
            ):
                break
            assert proc.poll() is None, (
                f"training ended before its first checkpoint: {log.read_text()[-2000:]}"
            )
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    reg = tomllib.loads(reg_path.read_text())["sft"]
    k = reg["step"]
    assert reg["finished"] is False and k % 3 == 0 and k < 400, (reg, log.read_text()[-2000:])
    assert {s.name: s for s in stage_status(ws)}["sft"].state == "interrupted"

    # 2. rerun (now to k + 6 steps): continues from step k
    n = k + 6
    events = [e async for e in Runner(ws).run_stage("sft", [f"sft.steps={n}", *ARGS])]
    assert isinstance(events[-1], StageFinished), events[-1]
    assert any(
        isinstance(e, LogLine) and e.message.startswith(f"resuming from step {k}") for e in events
    )
    resumed = _losses(events)
    assert sorted(resumed) == list(range(k + 1, n + 1))
    reg = tomllib.loads(reg_path.read_text())["sft"]
    assert reg["step"] == n and reg["finished"] is True

    # 3. the same n steps without a kill give the same losses: weights, step and Adam state survived
    ref_ws = make_tiny_workspace(tmp_path / "reference")
    write_data(ref_ws)
    ref = _losses([e async for e in Runner(ref_ws).run_stage("sft", [f"sft.steps={n}", *ARGS])])
    for step in range(k + 1, n + 1):  # same weights, step and Adam moments -> the same losses
        assert abs(resumed[step] - ref[step]) < 1e-3 * max(1.0, abs(ref[step])), (
            step,
            resumed,
            ref,
        )
    # and a fresh optimizer would not: the losses moved (lr is high), so the check has teeth
    assert abs(ref[n] - ref[1]) > 1e-2


@needs_backend
async def test_cancel_saves_a_checkpoint_and_resumes(ws: Workspace):
    write_data(ws)
    runner = Runner(ws)
    seen = 0
    final = None
    async for e in runner.run_stage("sft", ["sft.steps=50", "sft.checkpoint_every=100", *ARGS[2:]]):
        if isinstance(e, Metric) and e.name == "train/loss":
            seen += 1
            if seen == 2:
                runner.cancel()
        final = e
    assert isinstance(final, StageFailed) and final.cancelled and "resume" in final.message
    reg = tomllib.loads(ws.result("checkpoints.toml").read_text())["sft"]
    assert reg["finished"] is False and 2 <= reg["step"] <= 3  # stopped within one step
    (run,) = list_runs(ws, "sft")
    assert "running.json" not in [p.name for p in run.iterdir()]
    events = [e async for e in Runner(ws).run_stage("sft", ["sft.steps=5", *ARGS[2:]])]
    assert min(_losses(events)) == reg["step"] + 1 and isinstance(events[-1], StageFinished)


async def test_resume_from_a_deleted_checkpoint_starts_over(ws):
    import shutil

    from engine.store.checkpoints import latest_checkpoint, record_checkpoint

    write_data(ws)
    overrides = [*ARGS, "sft.steps=2", "sft.checkpoint_every=1"]
    assert isinstance(await Runner(ws).run("sft", overrides), StageFinished)
    entry = latest_checkpoint(ws.results_dir, "sft")
    record_checkpoint(ws.results_dir, "sft", finished=False, step=1)  # as if killed after step 1
    shutil.rmtree(entry["state_path"].removeprefix("local://"))
    events = [e async for e in Runner(ws).run_stage("sft", overrides)]
    assert isinstance(events[-1], StageFinished)
    assert any(isinstance(e, LogLine) and "cannot resume" in e.message for e in events)
    assert latest_checkpoint(ws.results_dir, "sft")["finished"] is True
