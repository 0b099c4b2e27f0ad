"""The Train tab: launching, the log, progress and stopping, charts live and replayed.

Pilot tests on a temporary tiny-model workspace; each waits for a state
(tui_helpers.until), never for time."""

from __future__ import annotations

import json

import pytest
from rich.text import Text
from textual.widgets import DataTable, Static
from tui_helpers import until, write_past_run, write_synthetic

from engine.run.events import LogLine, Progress, StageFinished, StageStarted
from engine.store.workspace import Workspace
from tui.app import create_app
from tui.train import MetricChart

SIZE = (80, 24)
WIDE = (100, 40)  # tests written for a larger terminal


def text_of(widget: Static) -> str:
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)


async def test_replay_past_run_into_charts(ws: Workspace):
    write_past_run(ws, "sft", steps=5)
    app = create_app(ws)
    async with app.run_test(size=WIDE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        await pilot.pause()
        table = app.query_one("#stage-table", DataTable)
        table.move_cursor(
            row=list(app.train.statuses).index(
                next(s for s in app.train.statuses if s.name == "sft")
            )
        )
        await pilot.press("r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.query_one("#loss-chart", MetricChart).points == 10
        assert app.query_one("#rates-chart", MetricChart).points == 1
        assert app.query_one("#rates-box").display  # 40 rows: both charts show


async def test_launch_sft_on_tiny_model(ws: Workspace):
    pytest.importorskip("engine.backends.local")
    write_synthetic(ws, 8, status="accepted")
    app = create_app(
        ws, overrides=["sft.sample_after=false", "sft.steps=3", "sft.checkpoint_every=0"]
    )
    async with app.run_test(size=WIDE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        await pilot.pause()
        names = [s.name for s in app.train.statuses]
        app.query_one("#stage-table", DataTable).move_cursor(row=names.index("sft"))
        await pilot.press("enter")
        await pilot.pause()
        final = await app.wait_for_stage()  # 3 tiny steps may already be done
        chart = app.query_one("#loss-chart", MetricChart)
        await until(
            pilot,
            lambda: app.running_stage is None and len(chart.series.get("train/loss", [])) == 3,
        )
        assert isinstance(final, StageFinished), final
        assert final.stage == "sft" and app.running_stage is None
        chart = app.query_one("#loss-chart", MetricChart)
        assert len(chart.series.get("train/loss", [])) == 3
        table = app.query_one("#stage-table", DataTable)
        await until(pilot, lambda: table.get_cell("sft", "state").plain == "done")
        assert isinstance(table.get_cell("sft", "state"), Text)


async def test_log_and_eta_visible_at_80_columns(ws: Workspace):
    """A run started from another tab shows its log on Train; the ETA fits in 80 columns."""
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        app.dispatch_event(StageStarted(stage="baseline", run_dir=""))
        for i in range(3):
            app.dispatch_event(LogLine(f"line {i}"))
        app.dispatch_event(Progress(3, 10, "baseline: sampling"))
        await pilot.press("f4")
        log = app.query_one("#log")
        await until(pilot, lambda: len(log.lines) >= 4 and log.pending == 0)
        bar = app.query_one("#progress")
        await until(pilot, lambda: bar.region.width > 0)
        assert bar.region.right <= SIZE[0]
        eta = bar.query_one("ETAStatus")
        assert eta.region.right <= SIZE[0] and eta.region.width >= 8


async def test_stopping_shows_at_once(ws: Workspace):
    """x marks the row `stopping…` before the stage ends."""
    import asyncio
    from dataclasses import dataclass
    from typing import Any

    from engine.pipeline.runner import Runner

    gate = asyncio.Event()

    @dataclass(frozen=True)
    class Spec:
        run: Any
        trains: bool = False

    async def slow(ctx):
        yield LogLine("working")
        await gate.wait()

    runner = Runner(ws, stages={"baseline": Spec(slow)})
    app = create_app(ws, runner=runner)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        assert app.launch_stage("baseline")
        table = app.query_one("#stage-table", DataTable)
        await until(pilot, lambda: table.get_cell("baseline", "state").plain == "running")
        await pilot.press("x")
        assert table.get_cell("baseline", "state").plain == "stopping…"
        gate.set()
        await app.wait_for_stage()
        await until(pilot, lambda: table.get_cell("baseline", "state").plain != "stopping…")


async def test_loss_chart_spans_resumed_runs(ws: Workspace):
    """A run resumed at step 6 shows steps 1-5 of the run before it too."""
    write_past_run(ws, "sft", steps=5)
    later = ws.runs_dir / "sft-20250102-000000"
    later.mkdir(parents=True)
    from engine.run.events import Metric, StageFinished, event_to_dict

    evs = [StageStarted(stage="sft", run_dir=str(later))]
    evs += [Metric("train/loss", s, 1.0 / s) for s in range(6, 9)]
    evs.append(StageFinished(stage="sft", outputs=(), summary=""))
    (later / "events.jsonl").write_text(
        "".join(json.dumps(event_to_dict(e)) + "\n" for e in evs), encoding="utf-8"
    )
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        app.train.replay(later)
        chart = app.query_one("#loss-chart", MetricChart)
        await until(pilot, lambda: len(chart.series.get("train/loss", [])) == 8)
        assert [p[0] for p in chart.series["train/loss"]] == list(range(1, 9))


def _write_run(run, events) -> None:
    from engine.run.events import event_to_dict

    run.mkdir(parents=True, exist_ok=True)
    with open(run / "events.jsonl", "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(event_to_dict(e)) + "\n" for e in events))


def _state(app, stage: str) -> str:
    return app.query_one("#stage-table", DataTable).get_cell(stage, "state").plain


async def test_a_stage_run_from_the_command_line_shows_running_then_done(ws: Workspace):
    """While another process runs a stage (its running marker names a live process) the row
    says running; when that run ends the row says done, without a key pressed."""
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    try:
        run = ws.runs_dir / "baseline-20990101-000000"
        _write_run(run, [StageStarted(stage="baseline", run_dir=str(run))])
        marker = {"pid": proc.pid, "pid_started": psutil.Process(proc.pid).create_time()}
        (run / "running.json").write_text(json.dumps(marker), encoding="utf-8")
        app = create_app(ws)
        async with app.run_test(size=SIZE) as pilot:
            await app.wait_ready()
            await pilot.press("f4")
            await until(pilot, lambda: _state(app, "baseline") == "running")
            names = [r.name for r in app.train.rows]
            app.query_one("#stage-table", DataTable).move_cursor(row=names.index("baseline"))
            info = app.query_one("#stage-info", Static)
            await until(pilot, lambda: "another process" in text_of(info))
            _write_run(run, [StageFinished(stage="baseline", outputs=(), summary="ok")])
            (run / "running.json").unlink()
            proc.stdin.close()
            await until(pilot, lambda: _state(app, "baseline") == "done")
    finally:
        proc.kill()
        proc.wait()


async def test_a_failed_rerun_keeps_the_finished_result_with_a_note(ws: Workspace):
    """A later failed or cancelled attempt does not relabel finished work: the row says done
    (marked !) and the info line names the attempt and its message."""
    from engine.run.events import StageFailed

    done = ws.runs_dir / "baseline-20250101-000000"
    _write_run(done, [StageStarted(stage="baseline", run_dir=str(done))])
    _write_run(done, [StageFinished(stage="baseline", outputs=(), summary="8 samples")])
    failed = ws.runs_dir / "baseline-20250102-000000"
    _write_run(failed, [StageStarted(stage="baseline", run_dir=str(failed))])
    _write_run(failed, [StageFailed(stage="baseline", message="TINKER_API_KEY is not set")])
    import os

    os.utime(failed / "events.jsonl", (2e9, 2e9))  # the newer run, whatever the clock
    os.utime(failed, (2e9, 2e9))
    cancelled = ws.runs_dir / "sft-20250102-000000"
    _write_run(cancelled, [StageStarted(stage="sft", run_dir=str(cancelled))])
    _write_run(cancelled, [StageFailed(stage="sft", message="stopped", cancelled=True)])
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        await until(pilot, lambda: bool(app.train.rows))
        assert _state(app, "baseline") == "done !"
        assert _state(app, "sft") == "cancelled"  # nothing finished before it
        names = [r.name for r in app.train.rows]
        app.query_one("#stage-table", DataTable).move_cursor(row=names.index("baseline"))
        info = app.query_one("#stage-info", Static)
        await until(pilot, lambda: "TINKER_API_KEY" in text_of(info))
        assert "the last attempt" in text_of(info) and "failed" in text_of(info)


async def test_ditto_and_rlaif_curves_show_at_80x24_with_legends(ws: Workspace):
    """Each training stage's main curves draw at 80x24, live and replayed, with a legend:
    ditto's sft and dpo losses on the loss chart, rl/* rewards on the next (c switches)."""
    from engine.run.events import Metric

    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        app.dispatch_event(StageStarted(stage="ditto", run_dir=""))
        for s in range(1, 4):
            app.dispatch_event(Metric("ditto/sft_loss", s, 2.0 / s))
            app.dispatch_event(Metric("ditto/dpo_loss", s, 0.7 / s))
            app.dispatch_event(Metric("rl/reward", s, 0.1 * s))
        loss = app.query_one("#loss-chart", MetricChart)
        await until(pilot, lambda: loss.points == 6 and not loss._dirty)
        assert loss.region.width >= 30 and loss.region.height >= 5  # on screen at 80x24
        legend = loss.parent.query_one(".chart-legend", Static)
        assert "ditto/sft_loss" in text_of(legend) and "ditto/dpo_loss" in text_of(legend)
        assert "c next" in loss.caption
        await pilot.press("c")
        rates = app.query_one("#rates-chart", MetricChart)
        await until(pilot, lambda: rates.region.height >= 5 and not rates._dirty)
        assert "rl/reward" in text_of(rates.parent.query_one(".chart-legend", Static))
        assert loss.region.height == 0  # one at a time at 80x24


async def test_a_cancelled_run_leaves_no_progress_or_eta_behind(ws: Workspace):
    """After a run is cancelled the bar and its ETA go; the label says where it stopped."""
    from engine.run.events import StageFailed

    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        app.dispatch_event(StageStarted(stage="sft", run_dir=""))
        app.dispatch_event(Progress(38, 100, "sft: steps"))
        bar = app.query_one("#progress")
        await until(pilot, lambda: bar.display and bar.progress == 38)
        app.dispatch_event(StageFailed(stage="sft", message="stopped", cancelled=True))
        label = app.query_one("#progress-label", Static)
        await until(pilot, lambda: "cancelled" in text_of(label))
        assert not bar.display and "38%" in text_of(label)
