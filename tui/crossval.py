"""The cross-validation screen (ctrl+k, or "Cross-validate" in the command palette): the plan
and its cost, launch or continue (s) / start another (n), stop (x), progress as fold i/k and
stage, and the report, switching between the cross-validated one and the single-split one (r).

It runs engine.crossval's own code (what ``persona crossval`` runs) in an app worker, so it goes
on when the screen is closed (escape) and the app's quit and "something is running" rules see
it as the running stage ``crossval``. The screen computes nothing itself: the plan, the cost
and the reports come from the engine and the files it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, Markdown, ProgressBar, RichLog, Static

from engine.run.events import LogLine, StageFailed, StageFinished, StageStarted
from engine.run.events import Progress as ProgressEvent
from tui.messages import EngineEvent

SCREEN = "crossval"
REPORTS = {"crossval": "crossval_report.md", "single": "report.md"}


TINKER_COST = "on Tinker the time depends on the service (k × each stage's run)"


def cost_line(ws: Any, plan: Any, profiles: Any) -> tuple[str, str]:
    """(the cost of ``plan`` in one line, what it assumes) from engine.crossval.estimate."""
    from engine.crossval.estimate import estimate_crossval

    est = estimate_crossval(plan, ws, profiles)
    if est is None:
        return TINKER_COST, ""
    assumed = [*est.notes, *(a for s in est.stages for a in s.assumptions)]
    return est.line(), "\n".join(dict.fromkeys(assumed))


def stages_left(plan: Any) -> str:
    """ "3 of 4 fold stages left"."""
    from engine.crossval import pending
    from engine.crossval.run import fold_stages

    return f"{len(pending(plan))} of {len(fold_stages(plan))} fold stages left"


def _plan_and_cost(ws: Any, overrides: list[str], new: bool) -> tuple[Any, bool, str]:
    """(plan, continuing, the cost line) in a worker thread; the plan is not written yet."""
    from engine.crossval import choose_plan
    from engine.pipeline.estimate import cached_profiles

    cfg = ws.config(overrides)
    plan, continuing = choose_plan(ws, cfg, overrides, None, new=new)
    cost = f"cost: {TINKER_COST}"
    if cfg.backend.name == "local":
        profiles, _missing = cached_profiles(cfg)
        if not profiles:
            cost = (
                "cost: this machine's speed is not measured yet (the Train tab measures it "
                "once when shown with nothing running; or `persona speed`)"
            )
        else:
            cost = f"cost: {cost_line(ws, plan, profiles)[0]}"
    return plan, continuing, (f", {stages_left(plan)}" if continuing else "") + "\n" + cost


class CrossvalScreen(Screen[None]):
    BINDINGS = [
        Binding("s", "start(False)", "Start/continue", id="crossval.start"),
        Binding("n", "start(True)", "Start new", id="crossval.new"),
        Binding("x", "stop", "Stop", id="crossval.stop"),
        Binding("r", "toggle_report", "Report", id="crossval.report"),
        Binding("escape", "close", "Close", id="crossval.close"),
    ]

    def __init__(self) -> None:
        super().__init__(id="crossval-screen")
        self.plan: Any = None
        self.cv: Any = None
        self.final: Any = None
        self.report_kind = ""  # "" = the log; "crossval" | "single": that report
        self.overrides: list[str] | None = None  # None: the app's own (--set)
        self.start_when_ready = False  # launched from the Train tab: start once planned

    def compose(self) -> ComposeResult:
        with Vertical(id="cv-body"):
            yield Static("Cross-validation: every demonstration held out once", id="cv-title")
            yield Static("reading the plan…", id="cv-plan")
            yield Label("", id="cv-progress")
            yield ProgressBar(id="cv-bar", show_eta=False)
            yield RichLog(id="cv-log", max_lines=500, wrap=True)
            yield Markdown("", id="cv-report")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#cv-report", Markdown).display = False
        self.refresh_plan()

    def refresh_plan(self, new: bool = False) -> None:
        if self.cv is None:
            self.run_worker(self._load_plan(new), group="cv-plan", exclusive=True)

    async def _load_plan(self, new: bool) -> None:
        from engine.errors import PersonaError

        try:
            plan, continuing, more = await asyncio.to_thread(
                _plan_and_cost, self.app.ws, self.launch_overrides(), new
            )
        except PersonaError as e:
            self.plan, self.start_when_ready = None, False
            self.query_one("#cv-plan", Static).update(Text(str(e), style="yellow"))
            return
        self.plan = plan
        head = "continue " if continuing else "new: "
        self.query_one("#cv-plan", Static).update(
            Text(f"{head}{self.app.ws.rel(plan.root)}: {plan.describe()}{more}")
        )
        if self.start_when_ready:
            self.start_when_ready = False
            self.action_start(False)

    def launch_overrides(self) -> list[str]:
        return list(self.app.default_overrides if self.overrides is None else self.overrides)

    # -- actions ---------------------------------------------------------------
    def action_start(self, new: bool) -> None:
        app = self.app
        if app.running_stage:
            app.notify_plain(f"{app.running_stage} is running; stop it or wait.", timeout=3)
            return
        if new or self.plan is None:
            self.refresh_plan(new=new)
            if self.plan is None or new:
                app.notify_plain("press s once the plan is shown", timeout=3)
                return
        from engine.crossval import Crossval

        self.cv = Crossval(app.ws, self.plan)
        self.final = None
        app.running_stage, app.stopping, app.active_runner = SCREEN, False, self.cv
        app._stage_done.clear()
        self.query_one("#cv-log", RichLog).clear()
        app.run_worker(self._drive(), name="stage-crossval", group="stage", exit_on_error=False)

    async def _drive(self) -> None:
        app, final = self.app, None
        try:
            await app._preloaded.wait()
            from engine.crossval import FoldEvent

            async for item in self.cv.run():
                if not isinstance(item, FoldEvent):
                    final = item
                self.show(item)
                _tell_train(app, item)
        except Exception as e:  # never let it take the app down
            final = StageFailed(stage=SCREEN, message=f"crossval failed: {type(e).__name__}: {e}")
            self.show(final)
            _tell_train(app, final)
        finally:
            self.final, self.cv = final, None
            app.running_stage, app.stopping, app.active_runner = None, False, app.runner
            app.last_final = final
            app._stage_done.set()
            self.refresh_plan()

    def show(self, item: Any) -> None:
        """One FoldEvent (progress, log) or the final event."""
        log = self.query_one("#cv-log", RichLog)
        ev = getattr(item, "event", item)
        if ev is not item:
            if isinstance(ev, StageStarted):
                bar = self.query_one("#cv-bar", ProgressBar)
                bar.update(total=item.total, progress=item.index - 1)
                log.write(Text(item.where, style="bold"))
            label = item.where
            if isinstance(ev, ProgressEvent) and ev.total:
                label += f" · {ev.label} {ev.done}/{ev.total}"
            self.query_one("#cv-progress", Label).update(Text(label))
            if isinstance(ev, LogLine) and ev.level != "info":
                log.write(Text(ev.message.splitlines()[-1], style="yellow"))
            return
        if isinstance(ev, StageFinished):
            bar = self.query_one("#cv-bar", ProgressBar)
            bar.update(progress=bar.total or 0)
            self.query_one("#cv-progress", Label).update(Text(f"done: {ev.summary}"))
            log.write(Text("wrote " + ", ".join(ev.outputs) + " (r shows the report)"))
        elif isinstance(ev, StageFailed):
            style = "yellow" if ev.cancelled else "red"
            self.query_one("#cv-progress", Label).update(Text(ev.message, style=style))

    def action_stop(self) -> None:
        if self.cv is not None:
            self.app.cancel_stage()
        else:
            self.app.notify_plain("Nothing is running.", timeout=2)

    def action_toggle_report(self) -> None:
        """log -> the cross-validated report -> the single-split report -> log."""
        order = ["", "crossval", "single"]
        self.report_kind = order[(order.index(self.report_kind) + 1) % len(order)]
        report = self.query_one("#cv-report", Markdown)
        self.query_one("#cv-log", RichLog).display = not self.report_kind
        report.display = bool(self.report_kind)
        if self.report_kind:
            path = self.app.ws.result(REPORTS[self.report_kind])
            text = (
                path.read_text(encoding="utf-8")
                if path.exists()
                else f"No {self.app.ws.rel(path)} yet: "
                + (
                    "run the cross-validation (s)."
                    if self.report_kind == "crossval"
                    else "run evaluate."
                )
            )
            report.update(text)

    def action_close(self) -> None:
        self.app.pop_screen()


def _tell_train(app: Any, item: Any) -> None:
    """The Train tab shows the running fold stage as it shows any stage, placed as
    "fold i/k · stage"."""
    from engine.crossval import FoldEvent

    with contextlib.suppress(Exception):  # the app may be closing
        where = item.where if isinstance(item, FoldEvent) else ""
        app.train.post_message(EngineEvent(getattr(item, "event", item), where=where))


def open_crossval(app: Any, overrides: list[str] | None = None, start: bool = False) -> None:
    """Show the screen (one per app: it keeps the running cross-validation's view).
    ``overrides``: what to plan with (default: the app's own); ``start``: start (or continue)
    once the plan is read, as Enter on the Train tab's crossval row does."""
    if start and app.running_stage:
        app.notify_plain(f"{app.running_stage} is running; stop it or wait.", timeout=3)
        return
    if not app.is_screen_installed(SCREEN):
        app.install_screen(CrossvalScreen(), name=SCREEN)
    screen = app.get_screen(SCREEN)
    if app.screen is not screen:
        app.push_screen(SCREEN)
    if not start:
        return
    screen.overrides = overrides
    screen.plan, screen.start_when_ready = None, True
    if screen.is_mounted:
        screen.refresh_plan()  # else on_mount reads it
