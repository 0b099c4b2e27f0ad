"""The Demonstrations tab: add, edit, delete and undo, reorder, held-out rows.

Pilot tests on a temporary tiny-model workspace; each waits for a state
(tui_helpers.until), never for time."""

from __future__ import annotations

import json

from textual import events
from textual.widgets import DataTable, Static, TextArea
from tui_helpers import toasts, type_burst, until

from engine.store.workspace import Workspace
from tui.app import create_app
from tui.dialogs import ConfirmScreen, PairEditScreen

SIZE = (80, 24)
WIDE = (100, 40)  # tests written for a larger terminal


def text_of(widget: Static) -> str:
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)


async def test_edit_demonstration_is_saved(ws: Workspace):
    app = create_app(ws)
    async with app.run_test(size=WIDE) as pilot:
        await pilot.pause()
        assert isinstance(app.focused, DataTable)
        await pilot.press("down", "e")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, PairEditScreen)
        new = "Hi Anita — moved to Mon 3/17. [/b] [red]not markup[/red]\n\n— Maya"
        dialog.query_one("#second", TextArea).text = new
        await pilot.press("ctrl+s")  # keep (the dialog's binding)
        await pilot.pause()
        assert not isinstance(app.screen, PairEditScreen)
        assert app.demos.dirty
        await pilot.press("ctrl+s")  # save the file
        await pilot.pause()
        assert not app.demos.dirty
        saved = json.loads(ws.demos_path.read_text(encoding="utf-8"))
        assert saved[1]["output"] == new.strip()
        # user markup shows as written
        assert "[/b] [red]not markup[/red]" in text_of(
            app.query_one("#demos-detail-output", Static)
        )


async def test_reorder_delete_and_invalid_not_saved(ws: Workspace):
    before = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    app = create_app(ws)
    async with app.run_test(size=WIDE) as pilot:
        await pilot.pause()
        await pilot.press("right_square_bracket", "ctrl+s")  # move entry 1 down, save
        await pilot.pause()
        saved = json.loads(ws.demos_path.read_text(encoding="utf-8"))
        assert saved[0] == before[1] and saved[1] == before[0]
        for _ in range(len(before) - 2):  # leave 2: fewer than the 3 needed
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.click("#choice-delete")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.demos.dirty
        assert json.loads(ws.demos_path.read_text(encoding="utf-8")) == saved  # unchanged
        assert "at least 3" in text_of(app.query_one("#demos-problems", Static))


async def test_keys_typed_before_the_editor_focused_land_in_it(ws: Workspace):
    """Keys typed right after `a` (a busy machine) go into the box being edited."""
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


async def test_keys_typed_in_one_burst_with_a_or_e_land_in_the_dialog(ws: Workspace):
    """`aHello` typed together (the terminal delivers them at once): the add dialog opens
    with Hello in its box; the same for `e`, where the typed text goes into the request."""
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.focused, DataTable))
        type_burst(app, ["a", "H", "e", "l", "l", "o"])
        await until(pilot, lambda: isinstance(app.focused, TextArea))
        box = app.screen.query_one("#first", TextArea)
        await until(pilot, lambda: box.text == "Hello")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, PairEditScreen))
        assert isinstance(app.focused, DataTable)
        request = app.demos.demos[0]["input"]
        type_burst(app, ["e", "N", "o", "w", " ", "escape", "a", "X"])  # escape: its binding
        await until(pilot, lambda: isinstance(app.screen, PairEditScreen))
        await until(pilot, lambda: app.screen.query_one("#first", TextArea).text == "X")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, PairEditScreen))
        type_burst(app, ["e", "N", "o", "w", " "])
        await until(pilot, lambda: isinstance(app.screen, PairEditScreen))
        box = app.screen.query_one("#first", TextArea)
        await until(pilot, lambda: box.text == "Now " + request)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, PairEditScreen))
        assert app.demos.demos[0]["input"] == "Now " + request and app.demos.dirty


async def test_demos_detail_delete_confirm_undo_and_holdout(ws: Workspace):
    """The person's text shows; delete asks and u undoes; held-out rows are marked."""
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


async def test_u_undoes_an_edit_and_typing_back_clears_unsaved(ws: Workspace):
    """u undoes edits too (not only deletes); an edit typed back to the saved text leaves
    nothing unsaved."""
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.focused, DataTable))
        original = dict(app.demos.demos[0])
        status = app.query_one("#demos-status", Static)
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, PairEditScreen))
        await until(pilot, lambda: bool(app.screen.query("#second")))
        app.screen.query_one("#second", TextArea).text = "Changed."
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.demos.dirty)
        assert "unsaved" in text_of(status)
        await pilot.press("u")
        await until(pilot, lambda: app.demos.demos[0] == original)
        assert not app.demos.dirty and "unsaved" not in text_of(status)
        # the same edit typed back by hand: nothing is unsaved either
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, PairEditScreen))
        await until(pilot, lambda: bool(app.screen.query("#second")))
        app.screen.query_one("#second", TextArea).text = "Changed."
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.demos.dirty)
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, PairEditScreen))
        await until(pilot, lambda: bool(app.screen.query("#second")))
        app.screen.query_one("#second", TextArea).text = original["output"]
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.demos.dirty)
        assert "unsaved" not in text_of(status)


async def test_editing_and_deleting_held_out_demos_keeps_holdout_json_consistent(ws: Workspace):
    """Saving an edited held-out request keeps it held out (data/holdout.json follows it);
    deleting a held-out one drops it from the record, another is held out in its place, and
    the person is told the split changed. The record never names a missing request."""
    from engine.store.settings import DataConfig
    from engine.store.split import read_record, split_demos, workspace_split

    workspace_split(ws, DataConfig())  # the record a first stage run writes
    app = create_app(ws)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await until(pilot, lambda: isinstance(app.focused, DataTable))
        first, second = sorted(app.demos.held)
        app.query_one("#demos-table", DataTable).move_cursor(row=first)
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.focused, TextArea))
        app.screen.query_one("#first", TextArea).text = "Ask Dr. Lee to move my cleaning"
        await pilot.press("ctrl+s")  # keep
        await until(pilot, lambda: not isinstance(app.screen, PairEditScreen))
        await pilot.press("ctrl+s")  # save
        await until(pilot, lambda: not app.demos.dirty)
        assert "Ask Dr. Lee to move my cleaning" in read_record(ws.data_dir).inputs
        assert app.demos.held == frozenset({first, second})
        await until(pilot, lambda: "still held out" in toasts(app))
        assert f"demonstration {first + 1} edited, still held out" in toasts(app)
        assert "evaluate uses the new split" in toasts(app)  # the whole notice, not cut
        problems = text_of(app.query_one("#demos-problems", Static))
        assert "matches no demonstration" not in problems
        app.query_one("#demos-table", DataTable).move_cursor(row=second)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#choice-delete")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.demos.dirty)
        await until(pilot, lambda: "deleted. Held out now" in toasts(app))
        assert "sft, reward-model, rlaif and ditto train again from the start" in toasts(app)
        assert len(app.demos.held) == 2 and first in app.demos.held
    saved = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    split = split_demos(saved, -1, 0, read_record(ws.data_dir))  # raised before the fix
    assert len(split.holdout) == 2 and saved[first] in split.holdout
