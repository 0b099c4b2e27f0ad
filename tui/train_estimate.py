"""The Train tab's estimate line: the selected stage's time at the current settings.

engine.pipeline.estimate computes it from this machine's speed profile, in a thread worker, once a
burst of keys and cursor moves has stopped. When no profile is cached for this machine, the
first time the tab is shown with nothing running it is measured once in the background (a
few seconds; engine/backends/local/speed_profile.py), never while a stage runs. The owner
(TrainPane) tells it what is selected, typed and running, and when inputs changed on disk
(rows accepted, demonstrations saved): it then estimates again.
"""

from __future__ import annotations

import re
import sys

from rich.text import Text
from textual import work
from textual.timer import Timer
from textual.widgets import Static
from textual.worker import get_current_worker

from engine.pipeline.estimate import (
    EstimateError,
    cached_profiles,
    estimate_stage,
    measure_profiles,
)
from engine.store.workspace import Workspace
from tui.text import one_line

# Models whose speed is not measured automatically: the tests' random model (a test that
# shows the tab must not measure the machine; `persona speed` measures it on demand).
NO_AUTO_MEASURE = frozenset({"persona/tiny-random"})
MEASURING = "measuring this machine's speed (once, a few seconds)…"
ESTIMATE_AFTER = 0.15  # seconds without a key or cursor move before the estimate starts


def split_overrides(text: str) -> list[str]:
    """``section.key=value`` items as typed in one line: a new item starts only where a
    ``name.name=`` follows a space, so values may hold spaces (``signoff="— Maya"``,
    ``only=[0, 3]``)."""
    text = text.strip()
    return re.split(r"\s+(?=[A-Za-z_][\w]*\.[\w.]*=)", text) if text else []


class StageEstimate(Static):
    DEFAULT_CSS = """
    StageEstimate {
        height: 1;
        padding: 0 1;
        color: $text-muted;
    }
    """

    def __init__(self, workspace: Workspace, default_overrides: list[str], **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.default_overrides = list(default_overrides)
        self.stage: str | None = None  # what the estimate is asked for
        self.typed = ""  # the overrides typed for the next launch
        self.running: str | None = None  # a stage runs: never measure then
        self.allowed = False  # the tab has been shown (the speed is measured only then)
        self.speed_state = ""  # "" | "measuring" | "measured" | "failed: ..."
        self.estimate_text = ""  # what the line says now
        self.estimate_for: tuple[str, str] | None = None  # (stage, overrides) it is for
        self._timer: Timer | None = None

    def on_mount(self) -> None:
        self.display = False

    def launch_overrides(self, typed: str) -> list[str]:
        """What a launch would run with: the app's own overrides, then the typed ones."""
        return [*self.default_overrides, *split_overrides(typed)]

    def request(self, stage: str | None = None, typed: str | None = None) -> None:
        """Estimate (again) once the burst of keys and cursor moves has stopped: typing an
        override starts one estimate, not one per key (a thread worker runs to its end even
        when replaced)."""
        if stage is not None:
            self.stage = stage
        if typed is not None:
            self.typed = typed
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(ESTIMATE_AFTER, self._request_now)

    def _request_now(self) -> None:
        self._timer = None
        if self.stage is None or "engine.stages" not in sys.modules:
            return
        may_measure = (
            self.allowed
            and self.running is None
            and self.speed_state != "measuring"
            and not self.speed_state.startswith("failed")
        )
        self._estimate(self.stage, self.typed, may_measure)

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False)
    def _estimate(self, name: str, overrides: str, may_measure: bool) -> None:
        try:
            text, measure, why = self._estimate_line(name, overrides, may_measure)
        except Exception as e:  # an estimate must never take the tab down
            text, measure, why = f"no estimate: {type(e).__name__}: {e}", [], ""
        if get_current_worker().is_cancelled:
            return
        self.app.call_from_thread(self._show, name, overrides, text, measure, why)

    def _estimate_line(
        self, name: str, overrides: str, may_measure: bool
    ) -> tuple[str, list[str], str]:
        """(the line to show, the models to measure, what the estimate assumes). Runs in a
        worker thread."""
        from engine.store.config import ConfigError

        try:
            cfg = self.ws.config(self.launch_overrides(overrides))
        except ConfigError as e:
            return f"no estimate: {e}", [], ""
        if cfg.backend.name != "local":
            return "runs on Tinker: its time depends on the service", [], ""
        profiles, missing = cached_profiles(cfg)
        # measured here once per machine: a profile of another thread count is used as it
        # is (`persona speed` measures the current count)
        wanted = [m for m in missing if m not in profiles and m not in NO_AUTO_MEASURE]
        measure = wanted if may_measure else []
        if cfg.model("policy") not in profiles:
            if not wanted:
                return "", [], ""  # the tests' model, never measured automatically: no line
            if measure or self.speed_state == "measuring":
                return MEASURING, measure, ""
            if self.speed_state.startswith("failed"):
                return f"no estimate: measuring this machine's speed {self.speed_state}", [], ""
            return "no estimate yet: this machine's speed is measured once nothing runs", [], ""
        if name == "crossval":
            line, why = self._crossval_line(cfg, overrides, profiles)
            return line, measure, why
        try:  # another role's model without a profile is priced at the policy's speed
            est = estimate_stage(name, cfg, self.ws, profiles)
        except EstimateError as e:
            return f"no estimate: {e}", measure, ""
        if est is None:
            return "runs on Tinker: its time depends on the service", [], ""
        return est.line(), measure, "\n".join(est.assumed())

    def _crossval_line(self, cfg, overrides: str, profiles) -> tuple[str, str]:
        """The cross-validation's cost (tui.crossval.cost_line: engine.crossval.estimate) and
        its plan: "crossval, 5 folds: ≤ 1.9 h on this machine (…)". Runs in a worker thread."""
        from engine.crossval import choose_plan
        from engine.errors import PersonaError
        from tui.crossval import cost_line, stages_left

        wanted = self.launch_overrides(overrides)
        try:
            plan, continuing = choose_plan(self.ws, cfg, wanted, None)
            line, why = cost_line(self.ws, plan, profiles)
        except PersonaError as e:
            return f"no estimate: {e}", ""
        if continuing:  # the cost is the whole plan's; what is done is not run again
            return f"crossval, {plan.k} folds, {stages_left(plan)}; in all {line}", why
        return f"crossval, {plan.k} folds: {line}", why

    def _show(self, name: str, overrides: str, text: str, measure: list[str], why: str) -> None:
        if measure and self.speed_state != "measuring" and self.running is None:
            self.speed_state = "measuring"
            self._measure(overrides, measure)
        if name != self.stage:
            return  # the cursor moved on; its own estimate is on the way
        self.estimate_text = text
        self.estimate_for = (name, overrides)
        style = "italic" if text == MEASURING else ""
        self.update(Text(one_line(text, 300), style=style, no_wrap=True, overflow="ellipsis"))
        self.tooltip = why or None
        self.display = bool(text)

    @work(thread=True, exclusive=True, group="speed", exit_on_error=False)
    def _measure(self, overrides: str, models: list[str]) -> None:
        from engine.backends.local.speed_profile import MeasureStopped

        try:
            cfg = self.ws.config(self.launch_overrides(overrides))
            measure_profiles(cfg, models, should_stop=lambda: self.running is not None)
            state = "measured"
        except MeasureStopped:
            state = ""  # a stage started: measured again once nothing runs
        except Exception as e:
            state = f"failed: {type(e).__name__}: {one_line(str(e), 120)}"
        self.app.call_from_thread(self._measured, state)

    def _measured(self, state: str) -> None:
        self.speed_state = state
        self.request()
