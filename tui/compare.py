"""Compare tab: a request, the person's text and each method's output; blind A/B; the report.

v side by side · b blind A/B (1/← left, 2/→ right, t tie, n skip, u undo, R redo) · p report.
Blind A/B draws pairs from every method with outputs for the same request; each pair is shown
once (a pair already picked in results/human_preferences.jsonl is not served again).

The Report view shows the evaluate stage's numbers as engine.eval.report.load_report gives them
(nothing is recomputed here): the summary table (best per column in bold with a *), the judge's
win-rate matrix, and every method's answers to one held-out request beside the person's text
(←/→ or the selector change the request), then the notes.
"""

from __future__ import annotations

import random
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalScroll, Vertical, VerticalScroll
from textual.widgets import ContentSwitcher, DataTable, OptionList, Select, Static
from textual.widgets.option_list import Option

from engine.eval.report import ReportData, load_report
from engine.run.events import StageFinished
from engine.store.results import (
    EVALUATION_FILE,
    METHOD_FILES,
    append_preference,
    preference_record,
    read_method_outputs,
    read_preferences,
    remove_preference,
)
from engine.store.workspace import Workspace
from tui.common import EngineEvent, focus_now, one_line, plain, read_demos

RELOAD_AFTER = {*METHOD_FILES, "demos", "evaluate"}


def load_outputs(
    ws: Workspace, problems: list[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """(requests, {method: {input: output}}). Requests: the demos first, then any held-out ones.
    Files that cannot be read are skipped and described in ``problems``."""
    problems = problems if problems is not None else []
    outputs: dict[str, dict[str, str]] = {}
    requests: dict[str, dict[str, Any]] = {}
    demos, error = read_demos(ws)
    if error:
        problems.append(error)
    for d in demos:
        inp = d["input"].strip()  # as the stages record it
        if inp:
            requests.setdefault(inp, {"input": inp, "expected": d["output"], "kind": "demo"})
    for method, name in METHOD_FILES.items():
        loaded = read_method_outputs(ws.result(name))
        if loaded.error:
            problems.append(loaded.error)
        if loaded.bad:
            problems.append(str(loaded.bad[0]))
        got = {}
        for r in loaded.rows:
            inp = str(r["input"])
            got[inp] = str(r.get("output", ""))
            if inp not in requests:
                requests[inp] = {
                    "input": inp,
                    "expected": str(r.get("expected_output", "")),
                    "kind": "held-out",
                }
        if got:
            outputs[method] = got
    from engine.store.results import preference_problems  # your picks' torn lines, named

    problems += preference_problems(ws.results_dir)
    return list(requests.values()), outputs


def pair_key(request: str, a: str, b: str) -> tuple[str, frozenset[str]]:
    return (request.strip(), frozenset((a, b)))


def remove_last_preference(ws: Workspace, record: dict[str, Any]) -> bool:
    """Undo: drop ``record`` (the last pick made here) from the preferences file."""
    return remove_preference(ws.results_dir, record)


# -- report formatting (the numbers come from engine.eval.report.load_report as they are) ------
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


class ComparePane(Vertical, can_focus=True):
    BINDINGS = [
        Binding(
            "v",
            "mode('side')",
            "Side",
            id="compare.side",
            tooltip="Compare view: the request, your text and every method's output",
        ),
        Binding(
            "b",
            "mode('blind')",
            "Blind",
            id="compare.blind",
            tooltip="Pick the better of two unlabelled outputs (feeds the report)",
        ),
        Binding(
            "p",
            "mode('report')",
            "Report",
            id="compare.report",
            tooltip="Compare view: the evaluate stage's report",
        ),
        Binding("1,left", "pick('a')", "Left", id="compare.left", tooltip="Blind A/B: left wins"),
        Binding(
            "2,right", "pick('b')", "Right", id="compare.right", tooltip="Blind A/B: right wins"
        ),
        Binding(
            "left",
            "request(-1)",
            "Prev request",
            id="compare.report_prev",
            tooltip="Report: the previous held-out request's answers",
        ),
        Binding(
            "right",
            "request(1)",
            "Next request",
            id="compare.report_next",
            tooltip="Report: the next held-out request's answers",
        ),
        Binding("t", "pick('tie')", "Tie", id="compare.tie", tooltip="Blind A/B: a tie"),
        Binding(
            "n",
            "next_pair",
            "Skip",
            id="compare.skip",
            tooltip="Blind A/B: skip this pair (it comes back later)",
        ),
        Binding("u", "undo", "Undo", id="compare.undo", tooltip="Blind A/B: undo the last pick"),
        Binding(
            "R",
            "redo_all",
            "Redo",
            id="compare.redo",
            show=False,
            tooltip="Blind A/B: serve again the pairs already picked",
        ),
    ]

    def __init__(self, workspace: Workspace, *, seed: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.rng = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.outputs: dict[str, dict[str, str]] = {}
        self.problems: list[str] = []
        self.mode = "side"
        self.pair: tuple[str, str, str] | None = None  # (request, method_a, method_b)
        self.queue: list[tuple[str, str, str]] = []  # pairs still to show
        self.picks: list[dict[str, Any]] = []  # made here, for undo
        self.labeled = 0
        self.redo = False  # serve pairs that were picked before too
        self.report: ReportData | None = None
        self.report_index = 0  # the held-out request whose answers the report shows

    def compose(self) -> ComposeResult:
        yield Static(id="compare-status", classes="status-line")
        with ContentSwitcher(initial="side", id="compare-switcher"):
            with Horizontal(id="side"):
                yield OptionList(id="request-list")
                with Vertical(id="side-right"):
                    with VerticalScroll(id="side-request-box"):
                        yield Static(id="side-request")
                    yield HorizontalScroll(id="side-columns")
            with Vertical(id="blind"):
                yield Static(id="blind-request", classes="detail")
                with Horizontal(id="blind-pair"):
                    with VerticalScroll(id="blind-a-box", classes="blind-box"):
                        yield Static(id="blind-a")
                    with VerticalScroll(id="blind-b-box", classes="blind-box"):
                        yield Static(id="blind-b")
            with Vertical(id="report"):
                yield Static(id="report-empty")
                with ReportScroll(id="report-body"):
                    yield Static(id="report-head")
                    yield DataTable(id="report-summary", cursor_type="none", zebra_stripes=True)
                    yield Static(id="report-matrix-title", classes="report-section")
                    yield DataTable(id="report-matrix", cursor_type="none")
                    yield Static(id="report-answers-title", classes="report-section")
                    yield Select[int](
                        [], id="report-request", prompt="Held-out request", compact=True
                    )
                    yield Static(id="report-input")
                    with Horizontal(id="report-answers"):
                        yield Static(id="report-person")
                        yield Static(id="report-methods")
                    yield Static(id="report-notes")

    def on_mount(self) -> None:
        self.reload()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("pick", "next_pair", "undo", "redo_all"):
            return self.mode == "blind"
        if action == "request":
            return self.mode == "report" and bool(self.report and self.report.requests)
        return True

    def reload(self) -> None:
        self.problems = []
        self.requests, self.outputs = load_outputs(self.ws, self.problems)
        self.labeled = len(read_preferences(self.ws.results_dir))
        ol = self.query_one("#request-list", OptionList)
        old = ol.highlighted
        ol.clear_options()
        ol.add_options(
            [
                Option(Text(("· " if r["kind"] == "demo" else "◦ ") + one_line(r["input"], 22)))
                for r in self.requests
            ]
        )
        if self.requests:
            ol.highlighted = old if old is not None and old < len(self.requests) else 0
        self.show_side()
        self.build_queue()
        if self.mode == "blind":
            self.pair = None
            self.next_pair()
        if self.mode == "report":
            self.show_report()
        self.show_status()

    def show_status(self) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(
            {"side": "Side by side", "blind": "Blind A/B", "report": "Report"}[self.mode],
            style="bold",
        )
        if self.mode == "report":
            rep = self.report
            t.append(
                f" · {len(rep.rows)} methods · {len(rep.requests)} held-out requests"
                if rep is not None
                else " · no evaluation yet"
            )
        else:
            t.append(f" · {len(self.requests)} requests · {len(self.outputs)} methods")
        if self.mode == "blind":
            t.append(f" · {len(self.queue) + (self.pair is not None)} pairs left", style="cyan")
        t.append(f" · {self.labeled} picks", style="dim")
        if self.problems:
            t.append("\n")
            t.append(one_line(self.problems[0], 200), style="red")
        self.query_one("#compare-status", Static).update(t)

    def default_focus(self):
        if self.mode == "side":
            return self.query_one("#request-list", OptionList)
        if self.mode == "report" and self.report is not None:
            return self.query_one("#report-body", ReportScroll)
        return self

    def focus_default(self) -> None:
        focus_now(self.default_focus())

    # -- side by side --------------------------------------------------------
    @on(OptionList.OptionHighlighted, "#request-list")
    def show_side(self) -> None:
        req_box = self.query_one("#side-request", Static)
        cols = self.query_one("#side-columns", HorizontalScroll)
        cols.remove_children()
        i = self.query_one("#request-list", OptionList).highlighted
        if i is None or not 0 <= i < len(self.requests):
            req_box.update(Text("No requests yet: add demonstrations and run stages.", style="dim"))
            return
        r = self.requests[i]
        t = Text("Request", style="bold")
        if r["kind"] != "demo":
            t.append("  (held out)", style="magenta")
        t.append("\n")
        t.append_text(plain(r["input"]))
        req_box.update(t)
        columns = [("Your text", "bold green", r["expected"] or "(none)")]
        for method, outs in self.outputs.items():
            columns.append((method, "bold cyan", outs.get(r["input"], "")))
        widgets = []
        for title, style, text in columns:
            body = Text(f"{title}\n", style=style)
            body.append_text(
                plain(text) if text else Text("(no output for this request)", style="dim")
            )
            box = VerticalScroll(Static(body), classes="side-col")
            widgets.append(box)
        cols.mount_all(widgets)

    # -- blind A/B -----------------------------------------------------------
    def all_pairs(self) -> list[tuple[str, str, str]]:
        """Every (request, method, method) pair with outputs from both, each once."""
        out = []
        names = list(self.outputs)
        for r in self.requests:
            have = [m for m in names if r["input"] in self.outputs[m]]
            for x in range(len(have)):
                for y in range(x + 1, len(have)):
                    out.append((r["input"], have[x], have[y]))
        return out

    def build_queue(self) -> None:
        done = set()
        if not self.redo:
            for p in read_preferences(self.ws.results_dir):
                done.add(pair_key(str(p.get("input", "")), str(p["a"]), str(p["b"])))
        pairs = [p for p in self.all_pairs() if pair_key(*p) not in done]
        self.rng.shuffle(pairs)
        self.queue = []
        for request, a, b in pairs:  # random sides
            self.queue.append((request, a, b) if self.rng.random() < 0.5 else (request, b, a))

    def next_pair(self) -> None:
        a_box, b_box = self.query_one("#blind-a", Static), self.query_one("#blind-b", Static)
        req_box = self.query_one("#blind-request", Static)
        if not self.queue:
            self.pair = None
            if len(self.outputs) < 2 or not self.all_pairs():
                msg = "Blind A/B needs two methods with outputs for the same request (run baseline and prompting first)."
            else:
                msg = (
                    f"No more pairs: every pair has a pick ({self.labeled} saved). "
                    "u undoes the last pick; R serves all pairs again."
                )
            req_box.update(Text(msg, style="bold"))
            a_box.update("")
            b_box.update("")
            self.show_status()
            return
        request, a, b = self.pair = self.queue.pop(0)
        t = Text("Request: ", style="bold")
        t.append_text(plain(request))
        t.append("\n1/← left · 2/→ right · t tie · n skip · u undo", style="dim")
        req_box.update(t)
        a_box.update(Text("Left\n", style="bold").append_text(plain(self.outputs[a][request])))
        b_box.update(Text("Right\n", style="bold").append_text(plain(self.outputs[b][request])))
        self.show_status()

    def action_pick(self, choice: str) -> None:
        if self.mode != "blind" or self.pair is None:
            return
        request, a, b = self.pair
        record = preference_record(request, a, b, choice)
        try:
            append_preference(self.ws.results_dir, record)
        except OSError as e:  # disk full, read-only folder: say so, keep the pair on screen
            self.app.notify_plain(str(e), title="Pick not saved", severity="error")
            return
        self.picks.append({"record": record, "pair": self.pair})
        self.labeled += 1
        self.next_pair()

    def action_next_pair(self) -> None:
        if self.pair is not None:
            if not self.queue:
                self.app.notify_plain("That is the only pair left.", timeout=2)
                return
            self.queue.append(self.pair)  # skipped: it comes back after the others
        self.next_pair()

    def action_undo(self) -> None:
        if not self.picks:
            self.app.notify_plain("No pick to undo here.", timeout=2)
            return
        last = self.picks.pop()
        if remove_last_preference(self.ws, last["record"]):
            self.labeled = max(0, self.labeled - 1)
        if self.pair is not None:
            self.queue.insert(0, self.pair)
        self.queue.insert(0, last["pair"])
        self.app.notify_plain("Last pick undone: pick again.", timeout=2)
        self.next_pair()

    def action_redo_all(self) -> None:
        self.redo = True
        self.build_queue()
        self.redo = False
        self.next_pair()

    # -- report --------------------------------------------------------------
    def show_report(self) -> None:
        """Load the last evaluation (engine.eval.report.load_report) and fill the Report view."""
        empty = self.query_one("#report-empty", Static)
        body = self.query_one("#report-body", ReportScroll)
        path = self.ws.result(EVALUATION_FILE)
        problem = ""
        try:
            self.report = load_report(self.ws)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self.report = None
            problem = f"{self.ws.rel(path)} has an unexpected shape ({type(e).__name__}: {e})."
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
        labels = {r["method"]: r.get("label") or r["method"] for r in rep.rows}
        head = Text("Evaluation", style="bold")
        if rep.created:
            head.append(f" of {rep.created}", style="bold")
        head.append(
            f"\n↓ lower better · ↑ higher better · {BEST} best · under each: 95% interval, n",
            style="dim",
        )
        self.query_one("#report-head", Static).update(head)

        table = self.query_one("#report-summary", DataTable)
        table.clear(columns=True)
        table.fixed_columns = 1
        table.add_column(Text("method", style="bold"), key="__method__")
        for key, header, better in rep.columns:
            table.add_column(summary_header(key, header, better), key=key)
        for r in rep.rows:
            cells = [Text(labels[r["method"]], style="bold cyan")]
            for key, _header, _better in rep.columns:
                cell = r["cells"].get(key) or {}
                cells.append(summary_cell(key, cell, key in r.get("best", ())))
            table.add_row(*cells, height=2, key=r["method"])

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
        labels = {row["method"]: row.get("label") or row["method"] for row in rep.rows}
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
        if self.mode != "report" or not self.report or not self.report.requests:
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

    def action_mode(self, mode: str) -> None:
        self.mode = mode
        self.query_one("#compare-switcher", ContentSwitcher).current = mode
        if mode == "blind":
            if self.pair is None:
                self.next_pair()
        elif mode == "report":
            self.show_report()
        self.show_status()
        self.focus_default()
        self.refresh_bindings()

    def on_engine_event(self, message: EngineEvent) -> None:
        ev = message.event
        # only stages whose files this tab shows (the synthesis and training logs are not)
        if isinstance(ev, StageFinished) and not message.replay and ev.stage in RELOAD_AFTER:
            self.reload()
