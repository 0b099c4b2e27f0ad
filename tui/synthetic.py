"""Synthetic data tab: review the teacher's rows. a/r/e decide, A accepts all shown, f/s filter.

Decisions are written back to results/synthetic_personalized_data.jsonl (atomically, a moment
after the last key press, and at once on ctrl+s or quit).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.timer import Timer
from textual.widgets import DataTable, Static

from engine.run.events import StageFinished
from engine.store.results import read_jsonl_checked, save_review
from engine.store.workspace import RESULT_FILES, Workspace
from tui.dialogs import PairEditScreen, focus_now
from tui.messages import EngineEvent, FilesChanged
from tui.text import cell, plain

DATA_FILE = RESULT_FILES["synth-outputs"]
STATUSES = ("pending", "accepted", "rejected", "edited")
STATUS_STYLE = {"pending": "yellow", "accepted": "green", "rejected": "red", "edited": "cyan"}
SAVE_DELAY = 0.4


def row_problem(row: Any) -> str:
    """Why a parsed line cannot be reviewed ("" when it can)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if not isinstance(row.get("messages", []), list):
        return "messages is not a list"
    if not isinstance(row.get("status", "pending"), str):
        return "status is not a string"
    return ""


def row_text(row: dict[str, Any], role: str) -> str:
    msgs = row.get("messages", [])
    if not isinstance(msgs, list):
        return ""
    if role == "assistant":
        msgs = list(reversed(msgs))
    for m in msgs:
        if isinstance(m, dict) and m.get("role") == role:
            return str(m.get("content", ""))
    return ""


def set_output(row: dict[str, Any], text: str) -> None:
    for m in reversed(row.get("messages", [])):
        if isinstance(m, dict) and m.get("role") == "assistant":
            m["content"] = text
            return
    row.setdefault("messages", []).append({"role": "assistant", "content": text})


def status_of(row: dict[str, Any]) -> str:
    s = row.get("status", "pending")
    return s if isinstance(s, str) else "invalid"


def status_cell(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


class SyntheticPane(Vertical):
    BINDINGS = [
        Binding("a", "decide('accepted')", "Accept", id="synth.accept"),
        Binding("r", "decide('rejected')", "Reject", id="synth.reject"),
        Binding("e", "edit", "Edit", id="synth.edit"),
        Binding("p", "decide('pending')", "Unreview", id="synth.pending", show=False),
        Binding("A", "accept_all", "Accept all", id="synth.accept_all"),
        Binding("f", "cycle_status", "Filter", id="synth.filter_status"),
        Binding("s", "cycle_seed", "Seed", id="synth.filter_seed"),
    ]

    def __init__(self, workspace: Workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.rows: list[dict[str, Any]] = []
        self.view: list[int] = []  # indexes into rows, in table order
        self.status_filter = "all"
        self.seed_filter = "all"
        self.seeds: list[str] = []
        self.error = ""
        self._save_timer: Timer | None = None
        self._touched: set[int] = set()  # rows reviewed here since the last load or save
        self._loaded_signature: tuple[int, int] | None = None
        self.unreadable = False  # part of the file could not be read: never write over it

    @property
    def path(self):
        return self.ws.result(DATA_FILE)

    def compose(self) -> ComposeResult:
        yield Static(id="synth-status", classes="status-line")
        table = DataTable(id="synth-table", cursor_type="row", zebra_stripes=True)
        table.add_column("status", key="status", width=8)
        table.add_column("seed", key="seed", width=14)
        table.add_column("request", key="input", width=28)
        table.add_column("answer", key="output")
        yield table
        with VerticalScroll(id="synth-detail-box", classes="detail"):
            yield Static(id="synth-detail")

    def on_mount(self) -> None:
        self.load()

    # -- data ----------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """Reviewed here and not yet saved."""
        return bool(self._touched)

    def _read_rows(self) -> list[dict]:
        """The rows, for review. A line that is not JSON, or not an object, is skipped and
        named in the status line, and then nothing is saved over the file (it would drop that
        line). A row whose status or messages has the wrong type is shown and named."""
        if not self.path.exists():
            return []
        name = self.ws.rel(self.path)
        problems: list[str] = []
        loaded = read_jsonl_checked(self.path)  # lines that are not JSON come back as bad
        if loaded.error:
            self.error = loaded.error
            self.unreadable = True
            return []
        for bad in loaded.bad:
            problems.append(f"{bad} (skipped)")
            self.unreadable = True
        rows = []
        for r, n in zip(loaded.rows, loaded.row_lines, strict=True):
            why = row_problem(r)
            if not isinstance(r, dict):
                problems.append(f"{name}: line {n}: {why} (skipped)")
                self.unreadable = True
                continue
            if why:
                problems.append(f"{name}: line {n}: {why}")
            rows.append(r)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            self.error = problems[0] + more
        return rows

    def _disk_signature(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> None:
        self.error = ""
        self.unreadable = False
        self.rows = self._read_rows()
        self._loaded_signature = self._disk_signature()
        self._touched = set()
        self.seeds = sorted({str(r.get("seed", "")) for r in self.rows})
        if self.seed_filter not in self.seeds:
            self.seed_filter = "all"
        self.rebuild()

    def save(self) -> bool:
        if self._save_timer is not None:
            self._save_timer.stop()
            self._save_timer = None
        if not self.dirty:
            return True
        if self.unreadable:
            self.app.notify_plain(
                f"{self.error}. Fix the file; reviews here are not saved over it.",
                title="Not saved",
                severity="error",
            )
            return False
        rewritten = self._disk_signature() != self._loaded_signature
        # Only the rows reviewed here are written, into the file as it is on disk now (under
        # the writers' lock): a stage or another terminal that rewrote it loses nothing.
        save_review(self.path, [self.rows[i] for i in self._touched if i < len(self.rows)])
        if rewritten:
            self.rows = self._read_rows()
            self.rebuild()
        self._loaded_signature = self._disk_signature()
        self._touched = set()
        self.show_status()
        self.post_message(FilesChanged("synthetic"))  # what sft trains on changed
        return True

    def _mark_dirty(self, *indices: int) -> None:
        self._touched.update(indices)
        if self._save_timer is not None:
            self._save_timer.stop()
        self._save_timer = self.set_timer(SAVE_DELAY, self.save)

    # -- view ----------------------------------------------------------------
    def _visible(self, row: dict[str, Any]) -> bool:
        if self.status_filter != "all" and status_of(row) != self.status_filter:
            return False
        return self.seed_filter == "all" or str(row.get("seed", "")) == self.seed_filter

    def rebuild(self) -> None:
        table = self.query_one("#synth-table", DataTable)
        table.clear()
        self.view = [i for i, r in enumerate(self.rows) if self._visible(r)]
        table.add_rows(
            (
                status_cell(status_of(r)),
                cell(str(r.get("seed", "")), 14),
                cell(row_text(r, "user"), 40),
                cell(row_text(r, "assistant"), 90),
            )
            for r in (self.rows[i] for i in self.view)
        )
        self.show_status()
        self.show_detail()

    def show_status(self) -> None:
        counts = {s: 0 for s in STATUSES}
        for r in self.rows:
            s = status_of(r)
            counts[s] = counts.get(s, 0) + 1
        t = Text(f"showing {len(self.view)} of {len(self.rows)}  ")
        for s in STATUSES:
            t.append(f"{s} {counts.get(s, 0)}  ", style=STATUS_STYLE[s])
        t.append(f"· filter: {self.status_filter}", style="bold")
        t.append(" / seed: ")
        t.append(
            plain(
                self.seed_filter if len(self.seed_filter) < 30 else self.seed_filter[:29] + "…",
                "bold",
            )
        )
        if self.dirty:
            t.append("  ● saving", style="yellow")
        if self.error:
            t.append("  " + self.error, style="red")
        if not self.rows:
            t = Text(
                f"No synthetic rows yet ({self.ws.rel(self.path)}): run synth-inputs and synth-outputs in the Train tab.",
                style="dim",
            )
        self.query_one("#synth-status", Static).update(t)

    def current_index(self) -> int | None:
        table = self.query_one("#synth-table", DataTable)
        i = table.cursor_row
        if 0 <= i < len(self.view):
            return self.view[i]
        return None

    @on(DataTable.RowHighlighted, "#synth-table")
    def show_detail(self) -> None:
        idx = self.current_index()
        box = self.query_one("#synth-detail", Static)
        if idx is None:
            box.update("")
            return
        r = self.rows[idx]
        t = Text()
        t.append(f"{r.get('id', '')} · {status_of(r)}", style="bold")
        if r.get("reason"):
            t.append(f" ({r['reason']})", style="dim")
        t.append("\nRequest: ", style="bold")
        t.append_text(plain(row_text(r, "user")))
        t.append("\n")
        t.append_text(plain(row_text(r, "assistant")))
        box.update(t)

    def default_focus(self):
        return self.query_one("#synth-table", DataTable)

    def focus_default(self) -> None:
        focus_now(self.default_focus())

    def _update_row(self, pos: int) -> None:
        table = self.query_one("#synth-table", DataTable)
        r = self.rows[self.view[pos]]
        key = table.coordinate_to_cell_key((pos, 0)).row_key
        table.update_cell(key, "status", status_cell(status_of(r)))
        table.update_cell(key, "output", cell(row_text(r, "assistant"), 90))

    # -- actions -------------------------------------------------------------
    def action_decide(self, status: str) -> None:
        table = self.query_one("#synth-table", DataTable)
        pos = table.cursor_row
        if not 0 <= pos < len(self.view):
            return
        self.rows[self.view[pos]]["status"] = status
        self._update_row(pos)
        self._mark_dirty(self.view[pos])
        self.show_status()
        nxt = self.next_pending(pos)
        if nxt is not None and nxt != pos:
            table.move_cursor(row=nxt)
        else:
            self.show_detail()

    def next_pending(self, pos: int) -> int | None:
        """The next row still pending after ``pos`` (wrapping round), so a decision is never
        overwritten by the next key; None when every row shown is decided."""
        n = len(self.view)
        for k in range(1, n + 1):
            p = (pos + k) % n
            if status_of(self.rows[self.view[p]]) == "pending":
                return p
        return None

    def action_accept_all(self) -> None:
        changed = [i for i in self.view if status_of(self.rows[i]) != "accepted"]
        for i in changed:
            self.rows[i]["status"] = "accepted"
        n = len(changed)
        if n:
            self._mark_dirty(*changed)
            pos = self.query_one("#synth-table", DataTable).cursor_row
            self.rebuild()
            if self.view:
                self.query_one("#synth-table", DataTable).move_cursor(
                    row=min(pos, len(self.view) - 1)
                )
        self.app.notify_plain(f"accepted {n} rows", timeout=2)

    @on(DataTable.RowSelected, "#synth-table")
    def action_edit(self) -> None:
        idx = self.current_index()
        if idx is None:
            return
        pos = self.query_one("#synth-table", DataTable).cursor_row
        row = self.rows[idx]
        if not isinstance(row.get("messages", []), list):
            self.app.notify_plain(
                f"{self.error or 'this row has no messages list'}", severity="error"
            )
            return

        def done(result: tuple[str, str] | None) -> None:
            if result is None or result[1] == row_text(row, "assistant"):
                return  # nothing changed: the row keeps its status
            set_output(row, result[1])
            row["status"] = "edited"
            if 0 <= pos < len(self.view) and self.view[pos] == idx:
                self._update_row(pos)
            self._mark_dirty(idx)
            self.show_status()
            self.show_detail()

        self.app.push_screen(
            PairEditScreen(
                f"Row {row.get('id', idx + 1)}",
                row_text(row, "user"),
                row_text(row, "assistant"),
                labels=("Request", "Answer (edit it to your style)"),
                first_editable=False,
            ),
            done,
        )

    def action_cycle_status(self) -> None:
        order = ("all", *STATUSES)
        self.status_filter = order[(order.index(self.status_filter) + 1) % len(order)]
        self.rebuild()

    def action_cycle_seed(self) -> None:
        order = ["all", *self.seeds]
        i = order.index(self.seed_filter) if self.seed_filter in order else 0
        self.seed_filter = order[(i + 1) % len(order)]
        self.rebuild()

    def on_engine_event(self, message: EngineEvent) -> None:
        ev = message.event
        if isinstance(ev, StageFinished) and ev.stage == "synth-outputs" and not message.replay:
            self.save()
            self.load()
