"""The cross-validation at 80x24: its screen (the plan and its cost line, launch, fold i/k
progress, the running-stage rule, the switch between the cross-validated and single-split
reports) and its row in the Train tab (cost before launch, enter starts it, fold i/k · stage
while it runs). Two folds of the methods that need no training (evaluate only), on the tiny
model."""

from __future__ import annotations

import pytest
from conftest import needs_backend
from test_tui_train_estimate import save_slow_profile
from textual.widgets import DataTable, Label, Markdown, RichLog, Static
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


@needs_backend
@pytest.mark.asyncio
async def test_train_tab_crossval_row_shows_cost_launches_and_follows_the_folds(ws, sp):
    save_slow_profile(sp, ws)  # a measured speed: the row's cost can be estimated
    app = create_app(ws, overrides=OVERRIDES)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        train = app.train
        await until(pilot, lambda: bool(train.rows))
        row = train.rows[-1]  # the last row, after the stages
        assert (row.name, row.state) == ("crossval", "not run")
        table = app.query_one("#stage-table", DataTable)
        await pilot.press(*["down"] * (len(train.rows) - 1))  # found by walking the list
        assert train.selected() == "crossval"
        # the row is scrolled into view at 80x24, and says what enter does
        await until(pilot, lambda: table.scroll_y == table.max_scroll_y > 0)
        info = _text(app.query_one("#stage-info", Static))
        assert "held out once" in info and "enter: start" in info and "ctrl+k" in info
        # before launch: k × each fold stage's estimate, from engine.crossval.estimate
        await until(pilot, lambda: train.estimate.estimate_for == ("crossval", ""))
        text = train.estimate.estimate_text
        assert text.startswith("crossval, 2 folds: ≤ "), text
        assert "on this machine" in text and "evaluate" in text and "per fold" in text
        assert app.query_one("#stage-estimate", Static).display

        await pilot.press("enter")  # plans, then starts on the cross-validation's screen
        await until(pilot, lambda: app.running_stage == SCREEN)
        screen = app.screen
        assert isinstance(screen, CrossvalScreen)
        await pilot.press("escape")  # back to the Train tab: it keeps running
        assert app.screen is not screen
        await until(pilot, lambda: screen.final is not None and app.running_stage is None)
        assert isinstance(screen.final, StageFinished), screen.final
        # the Train tab followed every fold stage, placed as fold i/k · stage
        log = [strip.text for strip in app.query_one("#log", RichLog).lines]
        for fold in ("fold 1/2 · evaluate", "fold 2/2 · evaluate"):
            assert any(line.startswith(f"▶ {fold}") for line in log), log
            assert any(line.startswith(f"✓ {fold} done") for line in log), log
        assert any(line.startswith("✓ crossval done") for line in log), log
        assert "crossval done" in _text(app.query_one("#progress-label", Label))
        await until(pilot, lambda: train.rows[-1].state == "done")
        # where its report is, and what enter does now
        await until(
            pilot, lambda: "report: F5, p, k" in _text(app.query_one("#stage-info", Static))
        )
        assert "enter: start or continue" in _text(app.query_one("#stage-info", Static))


CV_REPORT = """# Cross-validation: every demonstration held out once

| method | NLL per token | n |
|---|---|---|
| few-shot | 2.40 [2.21, 2.62] | 10 |
| ditto | 2.31 [2.12, 2.50] | 10 |

DITTO: no difference measurable with 10 demonstrations.
"""


@pytest.mark.asyncio
async def test_compare_report_switches_between_single_split_and_crossval(ws):
    from test_tui_report import write_small_evaluation

    from tui.compare_report import ReportView

    write_small_evaluation(ws)
    app = create_app(ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f5", "p")
        view = app.query_one(ReportView)
        title = app.query_one("#report-title", Static)
        await until(pilot, lambda: app.query_one("#report-body").display)
        assert "Single-split report" in _text(title) and "results/report.md" in _text(title)
        # the key is in the footer and the palette
        commands = [c.title for c in app.get_system_commands(app.screen)]
        assert "Cross-val (k)" in commands, commands
        assert app.screen.active_bindings["k"].binding.show  # in the footer too

        await pilot.press("k")  # none yet: it says how to make one
        assert view.kind == "crossval"
        assert "Cross-validated report" in _text(title) and "crossval_report.md" in _text(title)
        empty = app.query_one("#report-empty", Static)
        assert empty.display and not app.query_one("#report-body").display
        msg = _text(empty)
        assert "No cross-validated report yet" in msg and "persona crossval" in msg
        assert "Train tab" in msg
        assert "cross-validated" in _text(app.query_one("#compare-status", Static))

        await pilot.press("k")  # back to the single split, then the cross-validated one again
        assert view.kind == "single" and app.query_one("#report-body").display
        ws.result("crossval_report.md").write_text(CV_REPORT, encoding="utf-8")
        await pilot.press("k")  # read when shown: the file written since is there
        md = app.query_one("#report-cv-md", Markdown)
        assert md.source == CV_REPORT
        assert app.query_one("#report-cv").display and not empty.display
        assert not app.query_one("#report-body").display
        assert "Cross-validated report" in _text(title)
        await pilot.press("k")
        assert view.kind == "single" and "Single-split report" in _text(title)
        assert app.query_one("#report-body").display and not app.query_one("#report-cv").display
