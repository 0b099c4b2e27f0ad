"""The app as a whole: tabs and focus, quitting, the command palette, bad files, markup.

Pilot tests on a temporary tiny-model workspace; each waits for a state
(tui_helpers.until), never for time."""

from __future__ import annotations

import json

from textual.widgets import DataTable, Static
from tui_helpers import until, write_method_outputs, write_synthetic

from engine.store.workspace import Workspace
from tui.app import create_app
from tui.dialogs import ConfirmScreen
from tui.train import MetricChart

SIZE = (80, 24)
WIDE = (100, 40)  # tests written for a larger terminal


def text_of(widget: Static) -> str:
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)


async def test_quit_with_unsaved_changes_asks(ws: Workspace):
    app = create_app(ws)
    async with app.run_test(size=WIDE) as pilot:
        await pilot.pause()
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#choice-delete")
        await until(pilot, lambda: app.demos.dirty)
        await pilot.press("ctrl+q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")
        await pilot.pause()
        assert app.is_running and app.demos.dirty
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#choice-save")
        await pilot.pause()
    assert len(json.loads(ws.demos_path.read_text(encoding="utf-8"))) == 9


async def test_markup_in_user_text_is_literal(ws: Workspace):
    demos = [
        {"input": f"Request [/b] number {i} [red]x[/red]", "output": f"Text [bold]{i}[/] [/x]"}
        for i in range(3)
    ]
    ws.demos_path.write_text(json.dumps(demos), encoding="utf-8")
    write_synthetic(ws, 3)
    write_method_outputs(ws)
    app = create_app(ws)
    async with app.run_test(size=WIDE) as pilot:
        for key in ("f1", "f2", "f3", "f4", "f5", "b"):
            await pilot.press(key)
            await pilot.pause()
        assert "[/b]" in text_of(app.query_one("#blind-request", Static))


async def test_command_palette_lists_bindings(ws: Workspace):
    write_synthetic(ws, 3)
    app = create_app(ws)
    async with app.run_test(size=WIDE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        for want in ("Accept (a)", "Reject (r)", "Train (f4)", "Save (ctrl+s)", "Light/dark (f9)"):
            assert want in commands, list(commands)
        app.call_later(commands["Reject (r)"].callback)  # as the palette runs it
        await pilot.pause()
        assert app.synthetic.rows[0]["status"] == "rejected"
        await pilot.press("f9")
        assert app.theme == "textual-light"


async def test_command_palette_lists_each_command_once_on_every_tab(ws: Workspace):
    write_synthetic(ws, 3)
    app = create_app(ws)
    async with app.run_test(size=(80, 24)) as pilot:
        for key in ("f1", "f2", "f3", "f4", "f5"):
            await pilot.press(key)
            await pilot.pause()
            titles = [c.title for c in app.get_system_commands(app.screen)]
            doubled = sorted({t for t in titles if titles.count(t) > 1})
            assert doubled == [], (key, doubled)


async def test_quit_while_training_saves_a_checkpoint_first(ws: Workspace):
    import tomllib

    write_synthetic(ws, 8, status="accepted")
    app = create_app(
        ws, overrides=["sft.sample_after=false", "sft.steps=500", "sft.checkpoint_every=0"]
    )
    async with app.run_test(size=WIDE) as pilot:
        await app.wait_ready()
        assert app.launch_stage("sft")
        chart = app.query_one("#loss-chart", MetricChart)
        await until(pilot, lambda: bool(chart.series.get("train/loss")))  # training under way
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#choice-discard")
        await app.wait_for_stage()
        await pilot.pause()
    entry = tomllib.loads(ws.result("checkpoints.toml").read_text(encoding="utf-8"))["sft"]
    assert not entry["finished"] and 0 < entry["step"] < 500


async def test_tab_switch_survives_a_late_focus(ws: Workspace):
    """A focus meant for the tab being left lands after the switch; the new tab stays."""
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


async def test_bad_files_are_named_and_the_app_stays_usable(ws: Workspace):
    """Malformed or non-UTF-8 files and odd synthetic rows are named; the app stays usable."""
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


async def test_a_dialog_wraps_its_question_instead_of_cutting_words(ws: Workspace):
    """At 80x24 a long question is shown whole, wrapped at word boundaries."""
    from tui_helpers import screen_text

    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.focused, DataTable))
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await until(pilot, lambda: "Hold out demonstration" in screen_text(app))
        inside = [line.split("█")[1] for line in screen_text(app).splitlines() if "█" in line]
        words = " ".join(" ".join(inside).split())  # the dialog's own lines, within its border
        assert "never trained on; evaluate measures on them." in words
        assert "ditto) unfair to compare: run those again." in words
