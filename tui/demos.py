"""Demonstrations tab: the pairs in a table; add, edit, delete, reorder; problems inline; ctrl+s saves."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from engine.workspace import Workspace, WorkspaceError, validate_demos
from tui.common import PairEditScreen, cell, plain


class DemosPane(Vertical):
    BINDINGS = [
        Binding("a", "add", "Add", id="demos.add"),
        Binding("e", "edit", "Edit", id="demos.edit"),
        Binding("d,delete", "delete", "Delete", id="demos.delete"),
        Binding("shift+up,left_square_bracket", "move(-1)", "Move up", id="demos.up"),
        Binding("shift+down,right_square_bracket", "move(1)", "Move down", id="demos.down"),
    ]

    def __init__(self, workspace: Workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.demos: list[dict[str, str]] = []
        self.dirty = False
        self.load_error = ""

    def compose(self) -> ComposeResult:
        yield Static(id="demos-status", classes="status-line")
        table = DataTable(id="demos-table", cursor_type="row", zebra_stripes=True)
        table.add_column("#", key="n", width=3)
        table.add_column("Request", key="input", width=34)
        table.add_column("Your text", key="output")
        yield table
        yield Static(id="demos-detail", classes="detail")
        yield Static(id="demos-problems", classes="problems")

    def on_mount(self) -> None:
        self.load()

    # -- data ----------------------------------------------------------------
    def load(self) -> None:
        """Read data/data.json as it is (even when invalid, so the problems can be fixed here)."""
        demos, self.load_error = self.ws.read_demos_as_written()
        self.demos = demos
        self.dirty = False
        self.refresh_table()

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
        self.dirty = False
        self.refresh_table()
        self.app.notify_plain(f"Saved {self.ws.rel(self.ws.demos_path)}", timeout=2)
        return True

    # -- view ----------------------------------------------------------------
    def refresh_table(self, cursor: int | None = None) -> None:
        table = self.query_one("#demos-table", DataTable)
        old = table.cursor_row if cursor is None else cursor
        problems, bad = self.problems()
        table.clear()
        for i, d in enumerate(self.demos):
            mark = "red" if i in bad else ""
            table.add_row(
                Text(str(i + 1), style=mark), cell(d["input"], 40, mark), cell(d["output"], 80)
            )
        if self.demos:
            table.move_cursor(row=max(0, min(old, len(self.demos) - 1)))
        status = Text(f"{len(self.demos)} demonstrations · {self.ws.rel(self.ws.demos_path)}")
        if self.dirty:
            status.append("  ● unsaved (ctrl+s)", style="bold yellow")
        self.query_one("#demos-status", Static).update(status)
        box = self.query_one("#demos-problems", Static)
        lines = ([self.load_error] if self.load_error else []) + problems
        box.update(Text("\n".join(lines), style="red") if lines else Text("✓ valid", style="green"))
        self.show_detail()

    @on(DataTable.RowHighlighted, "#demos-table")
    def show_detail(self) -> None:
        table = self.query_one("#demos-table", DataTable)
        detail = self.query_one("#demos-detail", Static)
        i = table.cursor_row
        if not self.demos or not 0 <= i < len(self.demos):
            detail.update(Text("No demonstrations yet: press a to add one.", style="dim"))
            return
        d = self.demos[i]
        t = Text()
        t.append("Request: ", style="bold")
        t.append_text(plain(d["input"]))
        t.append("\n")
        t.append_text(plain(d["output"]))
        detail.update(t)

    def focus_default(self) -> None:
        self.query_one("#demos-table", DataTable).focus()

    # -- actions -------------------------------------------------------------
    def _changed(self, cursor: int | None = None) -> None:
        self.dirty = True
        self.refresh_table(cursor)

    def action_add(self) -> None:
        def done(result: tuple[str, str] | None) -> None:
            if result:
                self.demos.append({"input": result[0], "output": result[1]})
                self._changed(len(self.demos) - 1)

        self.app.push_screen(PairEditScreen("New demonstration", "", ""), done)

    @on(DataTable.RowSelected, "#demos-table")
    def action_edit(self) -> None:
        i = self.query_one("#demos-table", DataTable).cursor_row
        if not 0 <= i < len(self.demos):
            return

        def done(result: tuple[str, str] | None) -> None:
            if result and (result[0], result[1]) != (self.demos[i]["input"], self.demos[i]["output"]):
                self.demos[i] = {"input": result[0], "output": result[1]}
                self._changed(i)

        d = self.demos[i]
        self.app.push_screen(
            PairEditScreen(f"Demonstration {i + 1}", d["input"], d["output"]), done
        )

    def action_delete(self) -> None:
        i = self.query_one("#demos-table", DataTable).cursor_row
        if 0 <= i < len(self.demos):
            del self.demos[i]
            self._changed(i)

    def action_move(self, delta: int) -> None:
        i = self.query_one("#demos-table", DataTable).cursor_row
        j = i + delta
        if 0 <= i < len(self.demos) and 0 <= j < len(self.demos):
            self.demos[i], self.demos[j] = self.demos[j], self.demos[i]
            self._changed(j)
