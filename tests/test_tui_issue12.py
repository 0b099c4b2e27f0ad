"""Pilot tests at 80x24 for the new-user findings (issue 12) and the app's robustness (issue 13
#7). Each waits for the state it needs (tui_helpers.until), never for time."""

from __future__ import annotations

import json

from textual import events
from textual.widgets import DataTable, Static, TextArea
from tui_helpers import until, write_method_outputs, write_past_run, write_synthetic

from engine.run.events import LogLine, Progress, StageStarted
from engine.store.workspace import Workspace
from tui.app import create_app
from tui.common import ConfirmScreen, PairEditScreen
from tui.train import MetricChart

SIZE = (80, 24)


def text_of(widget: Static) -> str:
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)


async def test_tab_switch_survives_a_late_focus(ws: Workspace):
    """#10: a focus meant for the tab being left lands after the switch; the new tab stays."""
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.focused, DataTable))
        app.action_show_tab("train")
        app.query_one("#stage-table").focus()  # a deferred focus in Train, still in flight
        app.action_show_tab("demos")  # F1 pressed before it lands
        await until(pilot, lambda: app.focused is app.query_one("#demos-table"))
        for _ in range(5):
            await pilot.pause()
        assert app.query_one("#tabs").active == "demos"
        assert app.focused is app.query_one("#demos-table")
        for key, widget in (
            ("f2", "#system-prompt"),
            ("f4", "#stage-table"),
            ("f1", "#demos-table"),
        ):
            await pilot.press(key)
            assert app.focused is app.query_one(widget)  # moved when the tab activated


async def test_keys_typed_before_the_editor_focused_land_in_it(ws: Workspace):
    """#21: keys typed right after `a` (busy machine) go into the box being edited."""
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.focused, DataTable))
        app.demos.action_add()
        for ch in "Hi":
            app.post_message(events.Key(ch, ch))
        await until(pilot, lambda: isinstance(app.screen, PairEditScreen))
        await until(pilot, lambda: bool(app.screen.query("#first")))
        box = app.screen.query_one("#first", TextArea)
        await until(pilot, lambda: box.text == "Hi")
        await pilot.press("ctrl+s")  # the other box is empty: named
        assert "Your text (output): empty" in text_of(app.screen.query_one("#pair-error", Static))


async def test_synthetic_editor_keeps_typed_edits(ws: Workspace):
    """#2: `e`, Tab, type, ctrl+s keeps the text; nothing typed leaves the row as it was."""
    path = write_synthetic(ws, 3)
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: app.focused is app.query_one("#synth-table"))
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, PairEditScreen))
        await until(pilot, lambda: isinstance(app.focused, TextArea))
        assert app.focused.id == "second"
        await pilot.press("tab")  # the request is not a box: focus stays where typing goes
        app.focused.text = ""
        await pilot.press(*"Thu works")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, PairEditScreen))
        await pilot.press("down", "e")
        await until(pilot, lambda: isinstance(app.screen, PairEditScreen))
        await pilot.press("ctrl+s")  # unchanged
        await until(pilot, lambda: not isinstance(app.screen, PairEditScreen))
        await pilot.press("ctrl+s")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["status"] == "edited" and rows[0]["messages"][-1]["content"] == "Thu works"
    assert rows[1]["status"] == "pending"


async def test_decision_moves_to_the_next_pending_row(ws: Workspace):
    """#15: after a/r the cursor goes to the next row still pending."""
    path = write_synthetic(ws, 4)
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    rows[1]["status"] = "accepted"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3", "a")
        table = app.query_one("#synth-table", DataTable)
        await until(pilot, lambda: table.cursor_row == 2)
        await pilot.press("r")
        await until(pilot, lambda: table.cursor_row == 3)
        assert [r["status"] for r in app.synthetic.rows] == [
            "accepted",
            "accepted",
            "rejected",
            "pending",
        ]


async def test_blind_ab_each_pair_once_undo_skip_and_the_end(ws: Workspace):
    """#7 and issue 8 §4: pairs from every method, each once; u undoes; n skips; the end says so."""
    write_method_outputs(ws, methods=("baseline", "prompting", "sft"))
    demos = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    total = 3 * len(demos)
    app = create_app(ws, compare_seed=3)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5", "b")
        cmp = app.compare
        await until(pilot, lambda: cmp.pair is not None)
        first = cmp.pair
        await pilot.press("n")
        assert cmp.pair != first
        picked = cmp.pair
        await pilot.press("1")
        assert cmp.pair != picked
        await pilot.press("u")  # undo: the same pair again, the pick gone
        assert cmp.pair == picked
        assert not ws.result("human_preferences.jsonl").read_text(encoding="utf-8").strip()
        seen = set()
        for _ in range(total):
            request, a, b = cmp.pair
            key = (request, frozenset((a, b)))
            assert key not in seen
            seen.add(key)
            await pilot.press("t")
        assert cmp.pair is None and len(seen) == total
        assert "No more pairs" in text_of(app.query_one("#blind-request", Static))
        assert {m for k in seen for m in k[1]} == {"baseline", "prompting", "sft"}
    prefs = ws.result("human_preferences.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(prefs) == total


async def test_log_and_eta_visible_at_80_columns(ws: Workspace):
    """#3, #4: a run started from another tab shows its log on Train; the ETA fits."""
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
    """#8: x marks the row `stopping…` before the stage ends."""
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


async def test_demos_detail_delete_confirm_undo_and_holdout(ws: Workspace):
    """#18 the person's text shows; #19 delete asks and u undoes; issue 8 §1 held-out marks."""
    demos = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.focused, DataTable))
        assert demos[0]["output"].split()[0] in text_of(app.query_one("#demos-detail-output"))
        held = set(app.demos.held)
        assert held and "◆" in text_of(app.query_one("#demos-status"))
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")
        assert len(app.demos.demos) == len(demos)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#choice-delete")
        await until(pilot, lambda: len(app.demos.demos) == len(demos) - 1)
        await pilot.press("u")
        assert app.demos.demos == demos
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.demos.dirty)
        row = next(i for i in range(len(demos)) if i not in held)
        app.query_one("#demos-table", DataTable).move_cursor(row=row)
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "invalid" in text_of(app.screen.query_one("#question")) or "unfair" in text_of(
            app.screen.query_one("#question")
        )
        await pilot.click("#choice-change")
        await until(pilot, lambda: row in app.demos.held)
    record = json.loads((ws.data_dir / "holdout.json").read_text(encoding="utf-8"))
    assert record["manual"] and demos[row]["input"] in record["holdout"]


async def test_bad_files_are_named_and_the_app_stays_usable(ws: Workspace):
    """#20 and issue 13 #7: malformed or non-UTF-8 files, odd synthetic rows."""
    ws.demos_path.write_bytes(b'[{"input": "caf\xe9", "output": "x"}]\n')
    rows = [
        {"id": "a", "status": ["accepted"], "messages": [{"role": "user", "content": "r"}]},
        {"id": "b", "status": "pending", "messages": "not a list"},
        {"id": "c", "status": "pending", "messages": [{"role": "user", "content": "ok"}]},
    ]
    ws.result("synthetic_personalized_data.jsonl").parent.mkdir(parents=True, exist_ok=True)
    ws.result("synthetic_personalized_data.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    ws.result("baseline_results.json").write_bytes(b'[{"input": "\xff"}]')
    ws.result("checkpoints.toml").write_bytes(b'[sft]\nstep = "\xff"\n')
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.focused, DataTable))
        problems = text_of(app.query_one("#demos-problems"))
        assert "data/data.json" in problems and "not UTF-8" in problems and "line 1" in problems
        assert "ctrl+l" in text_of(app.query_one("#demos-detail-input"))
        await pilot.press("f3")
        status = text_of(app.query_one("#synth-status"))
        assert "line 1: status is not a string" in status
        await pilot.press("a", "f4", "f5")
        assert "data/data.json" in text_of(app.query_one("#compare-status"))
        from tui.compare import load_outputs

        problems: list[str] = []
        load_outputs(ws, problems)
        assert any("baseline_results.json" in p and "UTF-8" in p for p in problems)
        await app.wait_ready()
        await pilot.press("f4", "f1")
        assert app.is_running


async def test_side_by_side_is_columns_and_palette_text(ws: Workspace):
    """#17 one column per text; #22 the palette shows no internal action names."""
    write_method_outputs(ws, methods=("baseline", "sft"))
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await until(pilot, lambda: len(app.query(".side-col")) == 3)
        cols = list(app.query(".side-col"))
        assert cols[0].region.x < cols[1].region.x  # beside each other, not stacked
        commands = list(app.get_system_commands(app.screen))
        assert not [c for c in commands if "(show_tab" in c.help or "action (" in c.help]
        assert sum("theme" in c.title.lower() for c in commands) <= 1


async def test_loss_chart_spans_resumed_runs(ws: Workspace):
    """#14: a run resumed at step 6 shows steps 1-5 of the run before it too."""
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


async def test_prompts_file_keeps_header_and_multiline_strings(ws: Workspace):
    """#6: saving from the app keeps the explanation and writes multi-line strings as such."""
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.focused is app.query_one("#system-prompt"))
        app.focused.text = "Line one.\nLine two."
        await until(pilot, lambda: app.prompts.dirty)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.prompts.dirty)
    text = ws.prompts_path.read_text(encoding="utf-8")
    assert text.startswith("# Persona prompts")
    assert 'system_prompt = """\nLine one.\nLine two."""' in text
