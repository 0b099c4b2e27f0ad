"""Demonstrations tab: the pairs in a table; add, edit, delete (asks; u undoes), reorder,
mark held-out rows (h); problems inline; ctrl+s saves."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Static

from engine.store.workspace import Workspace, WorkspaceError, validate_demos
from tui.dialogs import ConfirmScreen, PairEditScreen, focus_now
from tui.messages import FilesChanged
from tui.text import cell, plain, read_demos

HELD = "held out"


def holdout_setting(ws: Workspace) -> tuple[int, int]:
    """persona.toml's data.holdout and data.holdout_seed (the defaults when it has a problem,
    which the Train tab and the stages report)."""
    try:
        cfg = ws.config().data
        return cfg.holdout, cfg.holdout_seed
    except Exception:
        return -1, 0


def holdout_for(ws: Workspace, demos: list[dict[str, str]]) -> tuple[frozenset[int], str]:
    """Which rows of ``demos`` (as shown, maybe unsaved) are held out, by the engine's rule
    (engine/split.py: split_demos with the recorded choice), and a problem if it can't say."""
    try:
        from engine.store.split import read_record, split_demos

        setting, seed = holdout_setting(ws)
        split = split_demos(demos, setting, seed, read_record(ws.data_dir))
        return split.holdout_index, split.warning
    except Exception as e:  # an unreadable data/holdout.json
        return frozenset(), str(e)


class DemosPane(Vertical):
    BINDINGS = [
        Binding("a", "add", "Add", id="demos.add", tooltip="Add a demonstration"),
        Binding("e", "edit", "Edit", id="demos.edit", tooltip="Edit the selected demonstration"),
        Binding(
            "d,delete",
            "delete",
            "Delete",
            id="demos.delete",
            tooltip="Delete the selected demonstration (asks first; u undoes)",
        ),
        Binding(
            "u",
            "undo",
            "Undo",
            id="demos.undo",
            show=False,
            tooltip="Undo the last add, edit, delete or move",
        ),
        Binding(
            "h",
            "toggle_holdout",
            "Held out",
            id="demos.holdout",
            tooltip="Hold the selected demonstration out of training (for evaluation), or back in",
        ),
        Binding(
            "shift+up,left_square_bracket",
            "move(-1)",
            "Up",
            show=False,
            id="demos.up",
            tooltip="Move the selected demonstration up",
        ),
        Binding(
            "shift+down,right_square_bracket",
            "move(1)",
            "Down",
            show=False,
            id="demos.down",
            tooltip="Move the selected demonstration down",
        ),
        Binding(
            "ctrl+l",
            "reload",
            "Reload",
            id="demos.reload",
            show=False,
            tooltip="Read data/data.json again (after fixing it in an editor)",
        ),
    ]

    def __init__(self, workspace: Workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.demos: list[dict[str, str]] = []
        self.dirty = False
        self.load_error = ""
        self.held: frozenset[int] = frozenset()
        self.holdout_note = ""
        self.saved: list[dict[str, str]] = []  # as on disk: "unsaved" means different from it
        # which demonstration each row is, across edits and moves (ids[i] for demos[i]), so a
        # save can tell data/holdout.json where a held-out one went (edited or deleted)
        self.ids: list[int] = []
        self.saved_ids: list[int] = []
        self.history: list[tuple[list[dict[str, str]], list[int], int]] = []  # for undo

    def compose(self) -> ComposeResult:
        yield Static(id="demos-status", classes="status-line")
        table = DataTable(id="demos-table", cursor_type="row", zebra_stripes=True)
        table.add_column("#", key="n", width=3)
        table.add_column("", key="held", width=1)
        table.add_column("Request", key="input", width=30)
        table.add_column("Your text", key="output")
        yield table
        with Horizontal(id="demos-detail", classes="detail"):
            with VerticalScroll(id="demos-detail-in"):
                yield Static(id="demos-detail-input")
            with VerticalScroll(id="demos-detail-out"):
                yield Static(id="demos-detail-output")
        yield Static(id="demos-problems", classes="problems")

    def on_mount(self) -> None:
        self.load(announce=False)

    # -- data ----------------------------------------------------------------
    def load(self, announce: bool = True) -> None:
        """Read data/data.json as it is (even when invalid, so the problems can be fixed here)."""
        demos, self.load_error = read_demos(self.ws)
        self.demos = demos
        self.saved = [dict(d) for d in demos]
        self.ids = list(range(len(demos)))
        self.saved_ids = list(self.ids)
        self.dirty = False
        self.history = []
        self.refresh_table()
        if announce:
            self.post_message(FilesChanged("demos"))  # Compare and Prompts read it again

    def problems(self) -> tuple[list[str], set[int]]:
        """Every validation problem, and the rows they are about."""
        try:
            validate_demos(self.demos, self.ws.rel(self.ws.demos_path))
        except WorkspaceError as e:
            return e.problems, e.entries
        return [], set()

    def save(self) -> bool:
        """Validate and write atomically (engine's save_demos). Returns True when written."""
        if self.load_error:  # saving now would drop what could not be read
            self.app.notify_plain(
                f"{self.load_error} Saving here would lose it, so nothing was written.",
                title="Not saved",
                severity="error",
            )
            return False
        try:
            self.ws.save_demos(self.demos)
        except WorkspaceError as e:
            self.app.notify_plain("\n".join(e.problems[:4]), title="Not saved", severity="error")
            self.refresh_table()
            return False
        before, before_ids = self.saved, self.saved_ids
        self.saved, self.saved_ids = [dict(d) for d in self.demos], list(self.ids)
        self.dirty = False
        self._follow_holdout(before, before_ids)
        self.refresh_table()
        self.post_message(FilesChanged("demos"))
        self.app.notify_plain(f"Saved {self.ws.rel(self.ws.demos_path)}", timeout=2)
        return True

    def _follow_holdout(self, before: list[dict[str, str]], before_ids: list[int]) -> None:
        """data/holdout.json follows edited and deleted held-out demonstrations (the engine's
        follow_demo_edits); the person is told when the held-out split changed."""
        from engine.errors import PersonaError
        from engine.store.split import follow_demo_edits

        where = {k: j for j, k in enumerate(self.ids)}
        moved_to = [where.get(k) for k in before_ids]
        try:
            update = follow_demo_edits(
                self.ws.data_dir, before, self.demos, moved_to, *holdout_setting(self.ws)
            )
        except (PersonaError, OSError) as e:  # a record already broken: shown below the table
            self.app.notify_plain(
                f"{e}", title="data/holdout.json not updated", severity="warning", timeout=15
            )
            return
        if update.changed:
            self.app.notify_plain(
                update.message(), title="Held-out split changed", severity="warning", timeout=20
            )

    # -- view ----------------------------------------------------------------
    def refresh_table(self, cursor: int | None = None) -> None:
        table = self.query_one("#demos-table", DataTable)
        old = table.cursor_row if cursor is None else cursor
        problems, bad = self.problems()
        self.held, self.holdout_note = (
            holdout_for(self.ws, self.demos) if not bad else (frozenset(), "")
        )
        table.clear()
        for i, d in enumerate(self.demos):
            mark = "red" if i in bad else ""
            table.add_row(
                Text(str(i + 1), style=mark),
                Text("◆", style="bold magenta") if i in self.held else Text(""),
                cell(d["input"], 40, mark),
                cell(d["output"], 80),
            )
        if self.demos:
            table.move_cursor(row=max(0, min(old, len(self.demos) - 1)))
        status = Text(f"{len(self.demos)} demonstrations")
        if self.held:
            status.append(f" · ◆ {len(self.held)} {HELD} (h)", style="magenta")
        status.append(f" · {self.ws.rel(self.ws.demos_path)}")
        if self.dirty:
            status.append("  ● unsaved (ctrl+s)", style="bold yellow")
        self.query_one("#demos-status", Static).update(status)
        box = self.query_one("#demos-problems", Static)
        lines = ([self.load_error] if self.load_error else []) + problems
        if lines:
            box.update(Text("\n".join(lines), style="red"))
        elif self.holdout_note:
            box.update(Text("✓ valid · " + self.holdout_note, style="yellow"))
        else:
            box.update(Text("✓ valid", style="green"))
        self.show_detail()

    @on(DataTable.RowHighlighted, "#demos-table")
    def show_detail(self) -> None:
        table = self.query_one("#demos-table", DataTable)
        left = self.query_one("#demos-detail-input", Static)
        right = self.query_one("#demos-detail-output", Static)
        i = table.cursor_row
        if not self.demos or not 0 <= i < len(self.demos):
            if self.load_error:
                left.update(
                    Text(
                        "data/data.json could not be read (see below). Fix it in an editor, "
                        "then press ctrl+l to read it again; the app will not overwrite it.",
                        style="yellow",
                    )
                )
            else:
                left.update(Text("No demonstrations yet: press a to add one.", style="dim"))
            right.update("")
            return
        d = self.demos[i]
        t = Text("Request", style="bold")
        if i in self.held:
            t.append(f"  ◆ {HELD}", style="magenta")
        t.append("\n")
        t.append_text(plain(d["input"]))
        left.update(t)
        right.update(Text("Your text\n", style="bold green").append_text(plain(d["output"])))

    def default_focus(self):
        return self.query_one("#demos-table", DataTable)

    def focus_default(self) -> None:
        focus_now(self.default_focus())

    # -- actions -------------------------------------------------------------
    def _remember(self) -> None:
        """Keep the demonstrations as they are now, for u (before every change)."""
        self.history.append(([dict(d) for d in self.demos], list(self.ids), self._cursor()))

    def _changed(self, cursor: int | None = None) -> None:
        self.dirty = self.demos != self.saved  # typed back to what is saved: not unsaved
        self.refresh_table(cursor)

    def _cursor(self) -> int:
        return self.query_one("#demos-table", DataTable).cursor_row

    def action_reload(self) -> None:
        if self.dirty:
            self.app.notify_plain("Unsaved changes here: save (ctrl+s) first.", severity="warning")
            return
        self.load()

    def action_add(self) -> None:
        if self.load_error:
            self.app.notify_plain(
                f"{self.load_error} Fix the file first (ctrl+l reads it again).",
                title="Cannot add",
                severity="error",
            )
            return

        def done(result: tuple[str, str] | None) -> None:
            if result:
                self._remember()
                self.demos.append({"input": result[0], "output": result[1]})
                self.ids.append(max([*self.ids, *self.saved_ids], default=-1) + 1)
                self._changed(len(self.demos) - 1)

        self.app.push_screen(PairEditScreen("New demonstration", "", ""), done)

    @on(DataTable.RowSelected, "#demos-table")
    def action_edit(self) -> None:
        i = self._cursor()
        if not 0 <= i < len(self.demos):
            return

        def done(result: tuple[str, str] | None) -> None:
            if result and (result[0], result[1]) != (
                self.demos[i]["input"],
                self.demos[i]["output"],
            ):
                self._remember()
                self.demos[i] = {"input": result[0], "output": result[1]}
                self._changed(i)

        d = self.demos[i]
        self.app.push_screen(
            PairEditScreen(f"Demonstration {i + 1}", d["input"], d["output"]), done
        )

    def action_delete(self) -> None:
        i = self._cursor()
        if not 0 <= i < len(self.demos):
            return

        def answer(choice: str | None) -> None:
            if choice == "delete" and i < len(self.demos):
                self._remember()
                self.demos.pop(i)
                self.ids.pop(i)
                self._changed(i)
                self.app.notify_plain(
                    f"Deleted demonstration {i + 1} (u brings it back).", timeout=3
                )

        q = f"Delete demonstration {i + 1}? “{cell(self.demos[i]['input'], 50).plain}” (u undoes it)"
        self.app.push_screen(
            ConfirmScreen(q, [("delete", "Delete"), ("cancel", "Keep it")]), answer
        )

    def action_undo(self) -> None:
        if not self.history:
            self.notify("Nothing to undo.", timeout=2)
            return
        self.demos, self.ids, cursor = self.history.pop()
        self._changed(cursor)

    def action_move(self, delta: int) -> None:
        i = self._cursor()
        j = i + delta
        if 0 <= i < len(self.demos) and 0 <= j < len(self.demos):
            self._remember()
            self.demos[i], self.demos[j] = self.demos[j], self.demos[i]
            self.ids[i], self.ids[j] = self.ids[j], self.ids[i]
            self._changed(j)

    def action_toggle_holdout(self) -> None:
        i = self._cursor()
        if not 0 <= i < len(self.demos):
            return
        if self.dirty or self.load_error or self.problems()[0]:
            self.app.notify_plain(
                "Save valid demonstrations first (ctrl+s); the held-out choice names saved ones.",
                severity="warning",
            )
            return
        held = set(self.held) ^ {i}
        inputs = [self.demos[k]["input"] for k in sorted(held)]
        verb = "Hold out" if i not in self.held else "Train on"
        q = (
            f"{verb} demonstration {i + 1}? Held-out demonstrations are never trained on; "
            "evaluate measures on them. Changing them makes results of trained stages "
            "(sft, reward-model, rlaif, ditto) unfair to compare: run those again."
        )

        def answer(choice: str | None) -> None:
            if choice != "change":
                return
            from engine.store.split import set_holdout

            try:
                set_holdout(self.ws, inputs)
            except Exception as e:
                self.app.notify_plain(str(e), title="Not changed", severity="error")
                return
            self.refresh_table(i)
            self.app.notify_plain(f"{len(self.held)} held out: data/holdout.json", timeout=3)

        self.app.push_screen(ConfirmScreen(q, [("change", verb), ("cancel", "Cancel")]), answer)
