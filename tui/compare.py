"""Compare tab: a request, the person's text and each method's output; blind A/B; the report.

v side by side · b blind A/B · p report (k there: single-split or cross-validated) ·
ctrl+l reads the files again. The three views are widgets of their own under one
ContentSwitcher (tui/compare_side.py, compare_blind.py, compare_report.py); this pane reads
the files, hands each view its data, and shows one status line from what the views report
back.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import ContentSwitcher, Static

from engine.run.events import StageFinished
from engine.store.results import METHOD_FILES, read_method_outputs
from engine.store.workspace import Workspace
from tui.compare_blind import BlindAB
from tui.compare_report import ReportView, scores_line
from tui.compare_side import SideBySide
from tui.dialogs import focus_now
from tui.messages import EngineEvent, FilesChanged
from tui.text import one_line, read_demos

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


MODES = {"side": "Side by side", "blind": "Blind A/B", "report": "Report"}


class ComparePane(Vertical, can_focus=True):
    BINDINGS = [
        Binding(
            "v",
            "mode('side')",
            "Side",
            id="compare.side",
            tooltip="Compare view: your text beside each method's output",
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
        Binding(
            "ctrl+l",
            "reload",
            "Reload",
            id="compare.reload",
            show=False,
            tooltip="Read the demonstrations, outputs and evaluation again",
        ),
    ]

    def __init__(self, workspace: Workspace, *, seed: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.seed = seed
        self.requests: list[dict[str, Any]] = []
        self.outputs: dict[str, dict[str, str]] = {}
        self.problems: list[str] = []
        self.mode = "side"

    def compose(self) -> ComposeResult:
        yield Static(id="compare-status", classes="status-line")
        with ContentSwitcher(initial="side", id="compare-switcher"):
            yield SideBySide(id="side")
            yield BlindAB(self.ws, id="blind", seed=self.seed)
            yield ReportView(self.ws, id="report")

    @property
    def side(self) -> SideBySide:
        return self.query_one(SideBySide)

    @property
    def blind(self) -> BlindAB:
        return self.query_one(BlindAB)

    @property
    def report_view(self) -> ReportView:
        return self.query_one(ReportView)

    def on_mount(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Read the files again and hand each view its data."""
        self.problems = []
        self.requests, self.outputs = load_outputs(self.ws, self.problems)
        self.report_view.load()
        rep = self.report_view.report
        scores = {m: line for m in self.outputs if (line := scores_line(rep, m))}
        self.side.set_data(self.requests, self.outputs, scores)
        self.blind.set_data(self.requests, self.outputs)
        self.show_status()

    def action_reload(self) -> None:
        self.reload()
        self.app.notify("Read the files again.", timeout=2)

    @on(ReportView.Loaded)
    def _report_loaded(self) -> None:
        if self.mode == "report" and self.screen.focused is self:
            self.focus_default()  # the report came: its keys (←/→) work at once
        self.show_status()

    @on(SideBySide.Shown)
    @on(BlindAB.Changed)
    def show_status(self) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(MODES[self.mode], style="bold")
        if self.mode == "report" and self.report_view.kind == "crossval":
            t.append(" · cross-validated")
        elif self.mode == "report":
            rep = self.report_view.report
            t.append(
                f" · {len(rep.rows)} methods · {len(rep.requests)} held-out requests"
                if rep is not None
                else " · no evaluation yet"
            )
        else:
            t.append(f" · {len(self.requests)} requests · {len(self.outputs)} methods")
        if self.mode == "side" and len(self.outputs) > len(self.side.shown_methods()):
            t.append(" · ←/→ other methods", style="cyan")
        if self.mode == "blind":
            t.append(f" · {self.blind.left} pairs left", style="cyan")
        t.append(f" · {self.blind.labeled} picks", style="dim")
        if self.problems:
            t.append("\n")
            t.append(one_line(self.problems[0], 200), style="red")
        self.query_one("#compare-status", Static).update(t)

    def default_focus(self):
        view = {"side": self.side, "blind": self.blind, "report": self.report_view}[self.mode]
        return view.default_focus() or self

    def focus_default(self) -> None:
        focus_now(self.default_focus())

    def action_mode(self, mode: str) -> None:
        self.mode = mode
        self.query_one("#compare-switcher", ContentSwitcher).current = mode
        if mode == "report":
            self.report_view.load()
        self.show_status()
        self.focus_default()

    def on_engine_event(self, message: EngineEvent) -> None:
        ev = message.event
        # only stages whose files this tab shows (the synthesis and training logs are not)
        if isinstance(ev, StageFinished) and not message.replay and ev.stage in RELOAD_AFTER:
            self.reload()

    def on_files_changed(self, message: FilesChanged) -> None:
        message.stop()
        if "demos" in message.what:
            self.reload()
