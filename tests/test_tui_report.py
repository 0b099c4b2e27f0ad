"""The Compare tab's Report view: the evaluate stage's numbers (engine.eval.report.load_report) as
tables at 80x24, the per-request answers, and the refresh after evaluate finishes."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import needs_backend
from textual.widgets import DataTable, Select, Static
from tui_helpers import until

from engine.eval.report import load_report
from engine.run.events import StageFinished
from engine.store.results import EVALUATION_SAMPLES_FILE, write_evaluation, write_evaluation_rows
from engine.store.workspace import Workspace
from tui.app import create_app
from tui.dialogs import focus_now
from tui.messages import EngineEvent

SIZE = (80, 24)
METHODS = ("baseline", "prompting", "sft")
LABELS = {"baseline": "base", "prompting": "prompted", "sft": "SFT"}


def _mean(v: float, half: float, n: int) -> dict[str, Any]:
    return {"mean": v, "low": v - half, "high": v + half, "n": n}


def _rate(wins: int, losses: int, ties: int, low: float, high: float) -> dict[str, Any]:
    n = wins + losses + ties
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "n": n,
        "rate": (wins + ties / 2) / n,
        "low": low,
        "high": high,
    }


def write_small_evaluation(ws: Workspace) -> dict[str, Any]:
    """A hand-made evaluation of three methods on two held-out requests (fixed numbers, so a
    snapshot of it never changes). User texts carry markup-like brackets."""
    inputs = ["Ask Sam to move lunch [/x] to Friday.", "Thank Jo for the cake."]
    person = ["Hi Sam — Friday instead? [/b] — Maya", "Jo! That cake. Thank you. — M"]
    nll = {"baseline": 3.512, "prompting": 3.204, "sft": 2.871}
    matrix = {
        "baseline": {
            "prompting": _rate(1, 2, 1, 0.15, 0.85),
            "sft": _rate(0, 3, 1, 0.03, 0.56),
        },
        "prompting": {
            "baseline": _rate(2, 1, 1, 0.15, 0.85),
            "sft": _rate(1, 2, 1, 0.15, 0.85),
        },
        "sft": {"baseline": _rate(3, 0, 1, 0.44, 0.97), "prompting": _rate(2, 1, 1, 0.15, 0.85)},
    }
    metrics = {}
    for i, m in enumerate(METHODS):
        metrics[m] = {
            "nll": _mean(nll[m], 0.4, 2),
            "style_distance": _mean(1.9 - 0.4 * i, 0.5, 4),
            "embedding_similarity": _mean(0.41 + 0.1 * i, 0.05, 4),
            "judge_vs_all": {
                "rate": 0.3 + 0.2 * i,
                "low": 0.1 + 0.2 * i,
                "high": 0.6 + 0.1 * i,
                "n": 8,
            },
            "dev_vs_baseline": {} if m == "baseline" else _rate(1, 0, 1, 0.2, 0.98),
            "cost": {
                "sampled_tokens": 40 + i,
                "training": {"seconds": 12.0, "steps": 2} if m == "sft" else None,
            },
        }
    data = {
        "version": 1,
        "created": "2025-01-01 12:00",
        "backend": "local",
        "methods": [{"name": m, "label": LABELS[m]} for m in METHODS],
        "metrics": metrics,
        "judge_matrix": matrix,
        "judge": {"used": True},
        "human": {"n_picks": 0},
        "holdout": {"n": 2, "indices": [3, 7], "inputs": inputs},
    }
    write_evaluation(ws.results_dir, data)
    rows = []
    for r, inp in enumerate(inputs):
        for m in METHODS:
            for k in range(2):
                rows.append(
                    {
                        "kind": "sample",
                        "id": f"{m}/{r}/{k}",
                        "method": m,
                        "request": r,
                        "input": inp,
                        "person_output": person[r],
                        "output": f"{LABELS[m]} answer {k + 1} to request {r + 1} [/i]",
                    }
                )
    write_evaluation_rows(ws.result(EVALUATION_SAMPLES_FILE), rows)
    return data


def screen_text(app) -> str:
    """Every visible line of the screen as plain text."""
    return "\n".join(
        "".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips()
    )


class Summary:
    """The summary, split into tables that fit the width: a cell looked up in whichever holds
    its column."""

    def __init__(self, app) -> None:
        self.tables = list(app.query(".report-summary").results(DataTable))

    @property
    def row_count(self) -> int:
        return self.tables[0].row_count

    @property
    def rows(self):
        return self.tables[0].rows

    def get_cell(self, row: str, column: str):
        for t in self.tables:
            if column in t.columns:
                return t.get_cell(row, column)
        raise KeyError(column)


async def open_report(app, pilot) -> None:
    await app.wait_ready()
    await pilot.press("f5", "p")
    await pilot.pause()


async def test_no_evaluation_says_what_to_run(ws: Workspace):
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await open_report(app, pilot)
        empty = app.query_one("#report-empty", Static)
        assert empty.display and not app.query_one("#report-body").display
        text = str(empty.render())
        assert "No evaluation yet" in text and "evaluate" in text and "Train tab" in text


async def test_report_tables_answers_and_refresh(ws: Workspace):
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await open_report(app, pilot)
        assert app.query_one("#report-empty").display  # nothing yet
        write_small_evaluation(ws)
        # evaluate finishing refreshes the view (as the app posts it to the panes)
        app.compare.post_message(EngineEvent(StageFinished(stage="evaluate")))
        await until(pilot, lambda: app.query_one("#report-body").display)
        rep = load_report(ws)
        assert rep is not None

        summary = Summary(app)
        assert summary.row_count == 3
        for m in METHODS:
            assert summary.get_cell(m, "__method__").plain == LABELS[m]
        # the best per column: bold and starred (SFT has the lowest NLL and style distance)
        best = summary.get_cell("sft", "nll")
        assert best.plain.startswith("2.871*") and "bold" in str(best.style)
        assert "*" not in summary.get_cell("baseline", "nll").plain
        assert summary.get_cell("sft", "nll").plain.endswith("2.471–3.271 n=2")
        assert summary.get_cell("sft", "judge").plain.startswith("70%*")
        assert summary.get_cell("baseline", "dev").plain == "–"
        for r in rep.rows:
            for key in r["best"]:
                assert summary.get_cell(r["method"], key).plain.split("\n")[0].endswith("*")

        matrix = app.query_one("#report-matrix", DataTable)
        assert matrix.display and matrix.row_count == 3
        assert matrix.get_cell("sft", "baseline").plain == "88% n=4\n44–97%"
        assert matrix.get_cell("baseline", "sft").plain.startswith("12% n=4")
        assert matrix.get_cell("prompting", "prompting").plain == "·"
        for a in METHODS:
            for b in METHODS:
                c = rep.matrix["cells"].get(a, {}).get(b)
                if c:
                    assert matrix.get_cell(a, b).plain.startswith(
                        f"{100 * c['rate']:.0f}% n={c['n']}"
                    )

        # the first request: the person's text and every method's answers, markup literal
        person = app.query_one("#report-person", Static)
        answers = app.query_one("#report-methods", Static)
        assert "Friday instead? [/b]" in str(person.render())
        first = str(answers.render())
        for m in METHODS:
            assert f"{LABELS[m]} answer 2 to request 1 [/i]" in first
        # → changes the request (the report scroll has the focus), and the selector follows
        await pilot.press("right")
        await pilot.pause()
        assert app.compare.report_view.report_index == 1
        assert app.query_one("#report-request", Select).value == 1
        assert "Jo! That cake." in str(person.render())
        assert "base answer 1 to request 2" in str(answers.render())
        # the selector changes it back
        app.query_one("#report-request", Select).value = 0
        await until(pilot, lambda: app.compare.report_view.report_index == 0)
        assert "Friday instead?" in str(person.render())
        assert "No blind A/B picks" in str(app.query_one("#report-notes", Static).render())

        # at 80x24: the header of the summary is not wrapped, the method column stays, and
        # every column of every summary table lies within the screen
        text = screen_text(app)
        assert "Report ·" in text and "method" in text and "NLL ↓" in text
        assert len(summary.tables) > 1
        for table in summary.tables:
            assert table.virtual_size.width <= table.scrollable_content_region.width
            assert "__method__" in table.columns
        keys = [k for t in summary.tables for k in t.columns if k != "__method__"]
        assert sorted(keys) == sorted(k for k, _h, _b in rep.columns)


@needs_backend
async def test_evaluate_launched_from_train_tab_fills_the_report(ws: Workspace):
    """The real stage on the tiny model (baseline, prompting, few-shot; a few seconds),
    launched from the Train tab while the Compare tab shows the (empty) report: its
    StageFinished refreshes the view."""
    app = create_app(
        ws,
        overrides=[
            "evaluate.samples=1",
            "evaluate.max_tokens=8",
            "evaluate.dev_prompts=0",
            "evaluate.embedding=false",
        ],
    )
    async with app.run_test(size=SIZE) as pilot:
        await open_report(app, pilot)
        assert app.query_one("#report-empty").display
        await pilot.press("f4")
        await pilot.pause()
        names = [s.name for s in app.train.statuses]
        app.query_one("#stage-table", DataTable).move_cursor(row=names.index("evaluate"))
        await pilot.press("enter")
        await pilot.pause()
        final = await app.wait_for_stage()
        assert isinstance(final, StageFinished), final
        body = app.query_one("#report-body")
        await until(pilot, lambda: body.display)  # refreshed without leaving the Train tab
        rep = load_report(ws)
        assert rep is not None
        await pilot.press("f5")
        await pilot.pause()
        summary = Summary(app)
        assert [str(k.value) for k in summary.rows] == [r["method"] for r in rep.rows]
        assert [r["method"] for r in rep.rows] == ["baseline", "prompting", "few-shot"]
        best = [(r["method"], k) for r in rep.rows for k in r["best"]]
        assert best  # NLL differs between the methods, so one is best
        for method, key in best:
            assert summary.get_cell(method, key).plain.split("\n")[0].endswith("*")
        matrix = app.query_one("#report-matrix", DataTable)
        assert matrix.row_count == 3
        n = rep.matrix["cells"]["baseline"]["prompting"]["n"]
        assert f"n={n}" in matrix.get_cell("baseline", "prompting").plain
        focus_now(app.compare.default_focus())
        await pilot.press("right")
        await pilot.pause()
        assert app.compare.report_view.report_index == 1
        assert rep.requests[1]["input"] in str(app.query_one("#report-input", Static).render())
        person = str(app.query_one("#report-person", Static).render())
        assert rep.requests[1]["person"].split("\n")[0].strip() in person
        shown = str(app.query_one("#report-methods", Static).render())
        assert all(label in shown for label in ("base", "prompted", "few-shot"))


@pytest.mark.parametrize("bad", ["[]", '{"methods": [{"label": "x"}]}'])
async def test_unexpected_evaluation_is_described(ws: Workspace, bad: str):
    ws.result("evaluation.json").write_text(bad, encoding="utf-8")
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await open_report(app, pilot)
        text = str(app.query_one("#report-empty", Static).render())
        assert "evaluate" in text and "Train tab" in text
