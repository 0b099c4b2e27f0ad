"""Compare tab: a request, the person's text and each method's output; blind A/B; the report.

v side by side · b blind A/B (1/← left, 2/→ right, t tie, n skip) · p the report.
"""

from __future__ import annotations

import json
import random
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import ContentSwitcher, Markdown, OptionList, Static
from textual.widgets.option_list import Option

from engine.events import StageFinished
from engine.workspace import RESULT_FILES, Workspace
from tui.common import EngineEvent, one_line, plain
from tui.preferences import append_preference, preference_record, read_preferences

METHOD_FILES = {m: RESULT_FILES[m] for m in ("baseline", "prompting", "sft", "rlaif", "ditto")}
RELOAD_AFTER = {*METHOD_FILES, "demos", "evaluate"}
HELD_OUT_FILE = "evaluation.json"  # optional: {"outputs": {method: [{"input", "expected_output", "output"}]}}


def load_outputs(ws: Workspace) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """(requests, {method: {input: output}}). Requests: the demos first, then any held-out ones."""
    outputs: dict[str, dict[str, str]] = {}
    requests: dict[str, dict[str, Any]] = {}
    demos, _error = ws.read_demos_as_written()
    for d in demos:
        inp = d["input"].strip()  # as the stages record it
        if inp:
            requests.setdefault(inp, {"input": inp, "expected": d["output"], "kind": "demo"})
    for method, name in METHOD_FILES.items():
        try:
            rows = json.loads(ws.result(name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        got = {}
        for r in rows if isinstance(rows, list) else []:
            if not isinstance(r, dict) or "input" not in r:
                continue
            inp = str(r["input"])
            got[inp] = str(r.get("output", ""))
            if inp not in requests:
                requests[inp] = {"input": inp, "expected": str(r.get("expected_output", "")), "kind": "held-out"}
        if got:
            outputs[method] = got
    return list(requests.values()), outputs


class ComparePane(Vertical, can_focus=True):
    BINDINGS = [
        Binding("v", "mode('side')", "Side by side", id="compare.side"),
        Binding("b", "mode('blind')", "Blind A/B", id="compare.blind"),
        Binding("p", "mode('report')", "Report", id="compare.report"),
        Binding("1,left", "pick('a')", "Left wins", id="compare.left"),
        Binding("2,right", "pick('b')", "Right wins", id="compare.right"),
        Binding("t", "pick('tie')", "Tie", id="compare.tie"),
        Binding("n", "next_pair", "Skip", id="compare.skip"),
    ]

    def __init__(self, workspace: Workspace, *, seed: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.rng = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.outputs: dict[str, dict[str, str]] = {}
        self.mode = "side"
        self.pair: tuple[str, str, str] | None = None  # (request, method_a, method_b)
        self.labeled = 0

    def compose(self) -> ComposeResult:
        yield Static(id="compare-status", classes="status-line")
        with ContentSwitcher(initial="side", id="compare-switcher"):
            with Horizontal(id="side"):
                yield OptionList(id="request-list")
                with VerticalScroll(id="side-outputs"):
                    yield Static(id="side-text")
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
        if action in ("pick", "next_pair"):
            return self.mode == "blind"
        return True

    def reload(self) -> None:
        self.requests, self.outputs = load_outputs(self.ws)
        self.labeled = len(read_preferences(self.ws.results_dir))
        ol = self.query_one("#request-list", OptionList)
        old = ol.highlighted
        ol.clear_options()
        ol.add_options(
            [
                Option(Text(("· " if r["kind"] == "demo" else "◦ ") + one_line(r["input"], 30)))
                for r in self.requests
            ]
        )
        if self.requests:
            ol.highlighted = old if old is not None and old < len(self.requests) else 0
        self.show_side()
        self.show_status()
        if self.mode == "blind" and self.pair is None:
            self.next_pair()
        if self.mode == "report":
            self.show_report()

    def show_status(self) -> None:
        t = Text()
        t.append({"side": "Side by side", "blind": "Blind A/B", "report": "Report"}[self.mode], style="bold")
        t.append(f"  · {len(self.requests)} requests · methods: {', '.join(self.outputs) or 'none yet'}")
        t.append(f" · {self.labeled} blind picks saved", style="dim")
        self.query_one("#compare-status", Static).update(t)

    def focus_default(self) -> None:
        if self.mode == "side":
            self.query_one("#request-list", OptionList).focus()
        else:
            self.focus()

    # -- side by side --------------------------------------------------------
    @on(OptionList.OptionHighlighted, "#request-list")
    def show_side(self) -> None:
        box = self.query_one("#side-text", Static)
        i = self.query_one("#request-list", OptionList).highlighted
        if i is None or not 0 <= i < len(self.requests):
            box.update(Text("No requests yet: add demonstrations and run stages.", style="dim"))
            return
        r = self.requests[i]
        t = Text()
        t.append("Request\n", style="bold")
        t.append_text(plain(r["input"]))
        t.append("\n\nYour text\n", style="bold green")
        t.append_text(plain(r["expected"] or "(none)"))
        for method, outs in self.outputs.items():
            t.append(f"\n\n{method}\n", style="bold cyan")
            if r["input"] in outs:
                t.append_text(plain(outs[r["input"]]))
            else:
                t.append("(no output for this request)", style="dim")
        box.update(t)

    # -- blind A/B -----------------------------------------------------------
    def candidates(self) -> list[tuple[str, list[str]]]:
        out = []
        for r in self.requests:
            methods = [m for m, o in self.outputs.items() if r["input"] in o]
            if len(methods) >= 2:
                out.append((r["input"], methods))
        return out

    def next_pair(self) -> None:
        cands = self.candidates()
        a_box, b_box = self.query_one("#blind-a", Static), self.query_one("#blind-b", Static)
        req_box = self.query_one("#blind-request", Static)
        if not cands:
            self.pair = None
            req_box.update(Text("Blind A/B needs two methods with outputs for the same request (run baseline and prompting first).", style="dim"))
            a_box.update("")
            b_box.update("")
            return
        request, methods = self.rng.choice(cands)
        a, b = self.rng.sample(methods, 2)
        self.pair = (request, a, b)
        t = Text("Request: ", style="bold")
        t.append_text(plain(request))
        t.append("\n1/← left · 2/→ right · t tie · n skip", style="dim")
        req_box.update(t)
        a_box.update(Text("Left\n", style="bold").append_text(plain(self.outputs[a][request])))
        b_box.update(Text("Right\n", style="bold").append_text(plain(self.outputs[b][request])))

    def action_pick(self, choice: str) -> None:
        if self.mode != "blind" or self.pair is None:
            return
        request, a, b = self.pair
        append_preference(self.ws.results_dir, preference_record(request, a, b, choice))
        self.labeled += 1
        self.show_status()
        self.next_pair()

    def action_next_pair(self) -> None:
        self.next_pair()

    # -- report --------------------------------------------------------------
    def show_report(self) -> None:
        path = self.ws.result("report.md")
        md = self.query_one("#report-md", Markdown)
        if path.exists():
            md.update(path.read_text(encoding="utf-8"))
        else:
            md.update("*No report yet.* Run the **evaluate** stage in the Train tab.")

    def action_mode(self, mode: str) -> None:
        self.mode = mode
        self.query_one("#compare-switcher", ContentSwitcher).current = mode
        if mode == "blind":
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
