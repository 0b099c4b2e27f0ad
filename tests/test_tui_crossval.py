"""The cross-validation screen at 80x24: the plan and its cost line, launch, fold i/k progress,
the running-stage rule, and the switch between the cross-validated and single-split reports.
Two folds of the methods that need no training (evaluate only), on the tiny model."""

from __future__ import annotations

import pytest
from conftest import needs_backend
from textual.widgets import Label, Markdown, RichLog, Static
from tui_helpers import until

from engine.run.events import StageFinished
from tui.app import create_app
from tui.crossval import SCREEN, CrossvalScreen

OVERRIDES = [
    "crossval.folds=2",
    'crossval.methods=["baseline", "few-shot"]',
    "evaluate.samples=1",
    "evaluate.max_tokens=4",
    "evaluate.dev_prompts=0",
    "evaluate.embedding=false",
    "evaluate.judge=false",
    "crossval.resamples=200",
]


def _text(widget) -> str:
    return str(widget.render())


@needs_backend
@pytest.mark.asyncio
async def test_crossval_screen_runs_two_folds_and_shows_both_reports(ws):
    app = create_app(ws, overrides=OVERRIDES)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.wait_ready()
        await pilot.press("ctrl+k")
        await until(pilot, lambda: isinstance(app.screen, CrossvalScreen))
        screen = app.screen
        plan = screen.query_one("#cv-plan", Static)
        await until(pilot, lambda: screen.plan is not None)
        assert "new: runs/crossval-" in _text(plan) and "2 folds" in _text(plan)
        assert "cost:" in _text(plan)
        label = screen.query_one("#cv-progress", Label)
        await pilot.press("s")
        assert app.running_stage == SCREEN
        app.launch_stage("baseline")  # one thing at a time: refused while crossval runs
        assert app.running_stage == SCREEN

        await until(pilot, lambda: screen.final is not None)
        assert isinstance(screen.final, StageFinished), screen.final
        # every fold stage that started is written to the log (the label moves on too fast
        # to be watched)
        log_lines = [strip.text for strip in screen.query_one("#cv-log", RichLog).lines]
        assert any("fold 1/2 · evaluate" in line for line in log_lines), log_lines
        assert any("fold 2/2 · evaluate" in line for line in log_lines), log_lines
        assert app.running_stage is None and ws.result("crossval.json").exists()
        await until(pilot, lambda: "done:" in _text(label))
        await pilot.press("r")  # the cross-validated report
        report = screen.query_one("#cv-report", Markdown)
        assert report.display and not screen.query_one("#cv-log", RichLog).display
        assert "every demonstration held out once" in report.source
        await pilot.press("r")  # the single-split one: none here yet, and it says so
        assert "No results/report.md yet" in report.source
        await pilot.press("r", "escape")
        assert app.screen is not screen and app.is_screen_installed(SCREEN)
