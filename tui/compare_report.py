"""Compare tab, the Report view: the evaluate stage's numbers as engine.report.load_report
gives them (nothing is recomputed here), or (k switches) the cross-validated report,
results/crossval_report.md as ``persona crossval`` wrote it. A title line says which is shown.

The summary table (best per column in bold with a *), split into as many tables as it takes
for every column to fit the width (each repeats the method column: nothing lies off-screen
at 80 columns); the judge's win-rate matrix; every method's answers to one held-out request
beside the person's text (←/→ or the selector change the request); then the notes.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Markdown, Select, Static

from engine.eval.report import ReportData, load_report
from engine.store.results import EVALUATION_FILE
from engine.store.workspace import Workspace
from tui.dialogs import focus_now
from tui.text import one_line, plain

SHORT_HEADERS = {
    "nll": "NLL",
    "style_distance": "style",
    "similarity": "MiniLM",
    "judge": "judge",
    "dev": "dev vs base",
    "human": "your picks",
    "sampled_tokens": "tokens",
    "train_seconds": "train s",
}
PERCENT_COLUMNS = {"judge", "dev", "human"}
DIGITS = {"nll": 3, "sampled_tokens": 0, "train_seconds": 0}
BEST = "*"
CROSSVAL_REPORT = "crossval_report.md"  # written by engine.crossval.report
SINGLE_REPORT = "report.md"  # written by the evaluate stage, from the evaluation shown here
KINDS = {
    "single": ("Single-split report", SINGLE_REPORT, "k: the cross-validated one"),
    "crossval": ("Cross-validated report", CROSSVAL_REPORT, "k: the single-split one"),
}


def _fmt(key: str, x: Any) -> str:
    if key in PERCENT_COLUMNS:
        return f"{100 * x:.0f}%"
    if isinstance(x, float):
        return f"{x:.{DIGITS.get(key, 2)}f}"
    return str(x)


def summary_header(key: str, header: str, better: str) -> Text:
    arrow = {"low": " ↓", "high": " ↑"}.get(better, "")
    return Text(SHORT_HEADERS.get(key, header) + arrow, style="bold")


def summary_cell(key: str, cell: dict[str, Any], best: bool) -> Text:
    """Two lines: the value (bold with a * when best in its column), then its 95% interval
    and n, dim."""
    v = cell.get("value")
    if v is None:
        return Text("–", style="dim")
    t = Text(_fmt(key, v) + (BEST if best else ""), style="bold" if best else "")
    low, high, n = cell.get("low"), cell.get("high"), cell.get("n")
    below = []
    if low is not None and high is not None:
        lo = f"{100 * low:.0f}" if key in PERCENT_COLUMNS else _fmt(key, low)
        below.append(f"{lo}–{_fmt(key, high)}")
    if n is not None:
        below.append(f"n={n}")
    if below:
        t.append("\n" + " ".join(below), style="dim")
    return t


def scores_line(rep: ReportData | None, method: str) -> str:
    """A method's evaluated value per column, one line (the Side by side column titles)."""
    row = next((r for r in (rep.rows if rep else []) if r["method"] == method), None)
    if row is None:
        return ""
    parts = []
    for key, header, _better in rep.columns:
        v = (row["cells"].get(key) or {}).get("value")
        if v is not None and key in ("nll", "style_distance", "judge", "human"):
            parts.append(f"{SHORT_HEADERS.get(key, header)} {_fmt(key, v)}")
    return " · ".join(parts)


def matrix_cell(a: str, b: str, cell: dict[str, Any] | None) -> Text:
    """Row method ``a`` against column method ``b``: the judge's win rate and n, then the
    interval."""
    if a == b:
        return Text("·", style="dim")
    if not cell or not cell.get("n") or cell.get("rate") is None:
        return Text("–", style="dim")
    t = Text(f"{100 * cell['rate']:.0f}% n={cell['n']}")
    if cell.get("low") is not None and cell.get("high") is not None:
        t.append(f"\n{100 * cell['low']:.0f}–{100 * cell['high']:.0f}%", style="dim")
    return t


def text_width(t: Text) -> int:
    return max((len(line) for line in t.plain.split("\n")), default=0)


def pack_columns(widths: list[int], first: int, room: int) -> list[list[int]]:
    """Column indices in groups, each group fitting ``room`` beside a first column of width
    ``first`` (cells are padded by one on each side). A column too wide alone gets its own."""
    groups: list[list[int]] = [[]]
    used = first + 2
    for i, w in enumerate(widths):
        if groups[-1] and used + w + 2 > room:
            groups.append([])
            used = first + 2
        groups[-1].append(i)
        used += w + 2
    return [g for g in groups if g]


class ReportScroll(VerticalScroll, inherit_bindings=False):
    """The report's scroll: up/down/page keys only (←/→ change the request)."""

    BINDINGS = [
        Binding("up", "scroll_up", "Scroll Up", show=False),
        Binding("down", "scroll_down", "Scroll Down", show=False),
        Binding("home", "scroll_home", "Scroll Home", show=False),
        Binding("end", "scroll_end", "Scroll End", show=False),
        Binding("pageup", "page_up", "Page Up", show=False),
        Binding("pagedown", "page_down", "Page Down", show=False),
    ]


class ReportView(Vertical, can_focus=True):
    BINDINGS = [
        Binding(
            "k",
            "switch_report",
            "Cross-val",
            id="compare.report_kind",
            tooltip="Report: switch between the single-split report (results/report.md) and "
            "the cross-validated one (results/crossval_report.md)",
        ),
        Binding(
            "left",
            "request(-1)",
            "Prev",
            id="compare.report_prev",
            tooltip="Report: the previous held-out request's answers",
        ),
        Binding(
            "right",
            "request(1)",
            "Next",
            id="compare.report_next",
            tooltip="Report: the next held-out request's answers",
        ),
    ]

    class Loaded(Message):
        """The report was read again (the pane's status line follows)."""

    def __init__(self, workspace: Workspace, **kw: Any) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.report: ReportData | None = None
        self.report_index = 0  # the held-out request whose answers are shown
        self.kind = "single"  # "single" | "crossval": the report shown (KINDS)
        self._width = 0  # the width the summary tables were split for

    def compose(self) -> ComposeResult:
        yield Static(id="report-title")
        yield Static(id="report-empty")
        with ReportScroll(id="report-cv"):
            yield Markdown(id="report-cv-md")
        with ReportScroll(id="report-body"):
            yield Static(id="report-head")
            yield Vertical(id="report-summaries")
            yield Static(id="report-matrix-title", classes="report-section")
            yield DataTable(id="report-matrix", cursor_type="none")
            yield Static(id="report-answers-title", classes="report-section")
            yield Select[int]([], id="report-request", prompt="Held-out request", compact=True)
            yield Static(id="report-input")
            with Horizontal(id="report-answers"):
                yield Static(id="report-person")
                yield Static(id="report-methods")
            yield Static(id="report-notes")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "request":
            return self.kind == "single" and bool(self.report and self.report.requests)
        return True

    def default_focus(self):
        body = self.query_one("#report-cv" if self.kind == "crossval" else "#report-body")
        return body if body.display else self  # k switches even where there is no report

    def action_switch_report(self) -> None:
        self.kind = "crossval" if self.kind == "single" else "single"
        had_focus = (
            self.screen.focused is not None and self in self.screen.focused.ancestors_with_self
        )
        self.load()
        if had_focus:
            focus_now(self.default_focus())

    def show_title(self) -> None:
        name, file, other = KINDS[self.kind]
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(name, style="bold reverse")
        t.append(f" {self.ws.rel(self.ws.result(file))}", style="bold")
        t.append(f" · {other}", style="dim")
        self.query_one("#report-title", Static).update(t)

    def load_crossval(self) -> None:
        """Show results/crossval_report.md, or say how to make it."""
        empty = self.query_one("#report-empty", Static)
        scroll = self.query_one("#report-cv", ReportScroll)
        self.query_one("#report-body", ReportScroll).display = False
        path = self.ws.result(CROSSVAL_REPORT)
        rel = self.ws.rel(path)
        text, problem = "", ""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as e:
            problem = f"{rel} cannot be read ({type(e).__name__}: {e})."
        if not text:
            msg = Text(f"No cross-validated report yet ({rel}).", style="bold")
            if problem:
                msg = Text(problem, style="bold red")
            msg.append(
                "\nRun `persona crossval` (or, in the Train tab (F4), the crossval row: "
                "enter). It trains and measures every method k times, each time holding out "
                "a different slice, so every demonstration is measured once; then this view "
                "shows the pooled report."
            )
            empty.update(msg)
            empty.display, scroll.display = True, False
        else:
            self.query_one("#report-cv-md", Markdown).update(text)
            empty.display, scroll.display = False, True
        self.post_message(self.Loaded())
        self.refresh_bindings()

    def on_resize(self) -> None:
        if self.report is not None and abs(self.size.width - self._width) >= 4:
            self.show_summary()

    def load(self) -> None:
        """Read the last evaluation (engine.report.load_report) and fill the view; or the
        cross-validated report, when that is the one shown."""
        self.show_title()
        if self.kind == "crossval":
            self.load_crossval()
            return
        self.query_one("#report-cv", ReportScroll).display = False
        empty = self.query_one("#report-empty", Static)
        body = self.query_one("#report-body", ReportScroll)
        path = self.ws.result(EVALUATION_FILE)
        problem = ""
        try:
            self.report = load_report(self.ws)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self.report = None
            problem = f"{self.ws.rel(path)} has an unexpected shape ({type(e).__name__}: {e})."
        self.post_message(self.Loaded())
        if self.report is None:
            msg = Text("No evaluation yet.", style="bold")
            if problem or path.exists():
                msg = Text("Cannot show the evaluation. ", style="bold red")
                msg.append(problem or f"{self.ws.rel(path)} cannot be read.", style="red")
            msg.append(
                "\nRun the evaluate stage in the Train tab (F4): it measures every method "
                "on your held-out demonstrations, then this view shows the summary table, the "
                "judge's win rates and every method's answers beside your text."
            )
            empty.update(msg)
            empty.display, body.display = True, False
            self.refresh_bindings()
            return
        empty.display, body.display = False, True
        rep = self.report
        head = Text("Evaluation", style="bold")
        if rep.created:
            head.append(f" of {rep.created}", style="bold")
        head.append(
            f"\n↓ lower better · ↑ higher better · {BEST} best · under each: 95% interval, n",
            style="dim",
        )
        self.query_one("#report-head", Static).update(head)
        self.show_summary()
        self.show_matrix()
        select = self.query_one("#report-request", Select)
        self.report_index = min(self.report_index, max(0, len(rep.requests) - 1))
        select.set_options(
            (Text(f"{i + 1}. " + one_line(r["input"], 70)), i) for i, r in enumerate(rep.requests)
        )
        if rep.requests:
            select.value = self.report_index
        select.display = bool(rep.requests)
        self.show_answers()
        notes = Text("Notes", style="bold")
        for n in rep.notes:
            notes.append("\n• ")
            notes.append_text(plain(n))
        if not rep.notes:
            notes.append("\nnone", style="dim")
        self.query_one("#report-notes", Static).update(notes)
        self.refresh_bindings()

    @property
    def labels(self) -> dict[str, str]:
        rows = self.report.rows if self.report else []
        return {r["method"]: r.get("label") or r["method"] for r in rows}

    def show_summary(self) -> None:
        """One table per group of columns that fits the width, the method column in each."""
        rep = self.report
        if rep is None:
            return
        self._width = self.size.width or 80
        labels = self.labels
        headers = [summary_header(k, h, b) for k, h, b in rep.columns]
        cells = {
            r["method"]: [
                summary_cell(k, r["cells"].get(k) or {}, k in r.get("best", ()))
                for k, _h, _b in rep.columns
            ]
            for r in rep.rows
        }
        widths = [
            max([text_width(headers[i])] + [text_width(c[i]) for c in cells.values()])
            for i in range(len(headers))
        ]
        first = max([len("method")] + [len(v) for v in labels.values()])
        box = self.query_one("#report-summaries", Vertical)
        # the tables shown are filled again in place: a table removed is only gone once the
        # removal is processed, and one mounted at once under its id would clash with it
        old = list(box.query_children(DataTable).results(DataTable))
        groups = pack_columns(widths, first, self._width - 4)
        if len(old) > len(groups):
            box.remove_children(old[len(groups) :])
        new = []
        for n, group in enumerate(groups):
            if n < len(old):
                table = old[n]
                table.clear(columns=True)
            else:
                table = DataTable(
                    id="report-summary" if n == 0 else f"report-summary-{n + 1}",
                    classes="report-summary",
                    cursor_type="none",
                    zebra_stripes=True,
                )
                new.append(table)
            table.add_column(Text("method", style="bold"), key="__method__")
            for i in group:
                table.add_column(headers[i], key=rep.columns[i][0])
            for r in rep.rows:
                row = [Text(labels[r["method"]], style="bold cyan")]
                table.add_row(
                    *row, *(cells[r["method"]][i] for i in group), height=2, key=r["method"]
                )
        if new:
            box.mount_all(new)

    def show_matrix(self) -> None:
        rep = self.report
        assert rep is not None
        labels = self.labels
        methods = list(rep.matrix.get("methods", []))
        grid = rep.matrix.get("cells") or {}
        matrix = self.query_one("#report-matrix", DataTable)
        matrix.clear(columns=True)
        judged = any((c or {}).get("n") for row in grid.values() for c in (row or {}).values())
        title = Text("Judge win rate, row vs column", style="bold")
        if judged:
            title.append(" (held-out requests, your text as reference)", style="dim")
        else:
            title.append(
                "\nThe judge did not run (evaluate.judge = false, or an empty rubric).",
                style="dim",
            )
        self.query_one("#report-matrix-title", Static).update(title)
        matrix.display = judged and len(methods) > 1
        if matrix.display:
            matrix.fixed_columns = 1
            matrix.add_column(Text("row vs col", style="bold"), key="__method__")
            for b in methods:
                matrix.add_column(Text(labels.get(b, b), style="bold"), key=b)
            for a in methods:
                row = [Text(labels.get(a, a), style="bold cyan")]
                row += [matrix_cell(a, b, (grid.get(a) or {}).get(b)) for b in methods]
                matrix.add_row(*row, height=2, key=a)

    def show_answers(self) -> None:
        """The chosen held-out request: the person's text beside every method's answers."""
        rep = self.report
        title = self.query_one("#report-answers-title", Static)
        inp = self.query_one("#report-input", Static)
        person = self.query_one("#report-person", Static)
        answers = self.query_one("#report-methods", Static)
        if rep is None or not rep.requests:
            title.update(Text("No held-out answers were recorded.", style="dim"))
            for w in (inp, person, answers):
                w.update("")
            return
        i = self.report_index
        r = rep.requests[i]
        title.update(
            Text("Answers to held-out request ", style="bold")
            .append(f"{i + 1} of {len(rep.requests)}")
            .append("  ←/→ or the selector", style="dim")
        )
        inp.update(Text("Request: ", style="bold").append_text(plain(r.get("input", ""))))
        person.update(
            Text("Your text\n", style="bold green").append_text(
                plain(r.get("person") or "") if r.get("person") else Text("(none)", style="dim")
            )
        )
        labels = self.labels
        order = [row["method"] for row in rep.rows]
        order += [m for m in r.get("answers", {}) if m not in order]
        t = Text()
        for m in order:
            texts = r.get("answers", {}).get(m) or []
            if t.plain:
                t.append("\n\n")
            t.append(labels.get(m, m), style="bold cyan")
            if not texts:
                t.append("\n(no answer)", style="dim")
            for k, text in enumerate(texts):
                if len(texts) > 1:
                    t.append(f"\nsample {k + 1}/{len(texts)}", style="dim")
                t.append("\n")
                t.append_text(plain(text) if str(text).strip() else Text("(empty)", style="dim"))
        answers.update(t)

    def action_request(self, step: int) -> None:
        if not self.report or not self.report.requests:
            return
        self.report_index = (self.report_index + step) % len(self.report.requests)
        self.query_one("#report-request", Select).value = self.report_index
        self.show_answers()

    @on(Select.Changed, "#report-request")
    def request_chosen(self, event: Select.Changed) -> None:
        if isinstance(event.value, int):
            if event.value != self.report_index:
                self.report_index = event.value
                self.show_answers()
        elif self.report and self.report.requests:  # the blank choice: keep the request shown
            event.select.value = self.report_index
