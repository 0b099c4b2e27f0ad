"""Compare tab: a request, the person's text and each method's output; blind A/B; the report.

v side by side · b blind A/B (1/← left, 2/→ right, t tie, n skip, u undo, R redo) · p report.
Blind A/B draws pairs from every method with outputs for the same request; each pair is shown
once (a pair already picked in results/human_preferences.jsonl is not served again).
"""

from __future__ import annotations

import random
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalScroll, Vertical, VerticalScroll
from textual.widgets import ContentSwitcher, Markdown, OptionList, Static
from textual.widgets.option_list import Option

from engine.events import StageFinished
from engine.results import (
    METHOD_FILES,
    append_preference,
    preference_record,
    read_method_outputs,
    read_preferences,
    remove_preference,
)
from engine.workspace import Workspace
from tui.common import EngineEvent, focus_now, one_line, plain, read_demos, read_problem

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
    return list(requests.values()), outputs


def pair_key(request: str, a: str, b: str) -> tuple[str, frozenset[str]]:
    return (request.strip(), frozenset((a, b)))


def remove_last_preference(ws: Workspace, record: dict[str, Any]) -> bool:
    """Undo: drop ``record`` (the last pick made here) from the preferences file."""
    return remove_preference(ws.results_dir, record)


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
            with VerticalScroll(id="report"):
                yield Markdown(id="report-md")

    def on_mount(self) -> None:
        self.reload()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("pick", "next_pair", "undo", "redo_all"):
            return self.mode == "blind"
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
        append_preference(self.ws.results_dir, record)
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
        path = self.ws.result("report.md")
        md = self.query_one("#report-md", Markdown)
        if not path.exists():
            md.update("*No report yet.* Run the **evaluate** stage in the Train tab (F4).")
            return
        try:
            md.update(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            md.update(f"**Cannot show the report.** {read_problem(path, e, self.ws.rel(path))}")

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
