"""Train tab: every stage with its state; enter launches, x cancels, r replays the last run.

A live log, live curves (loss on one chart, rewards / win rates / other metrics on another),
and a progress bar with ETA (from the run's real rate). Replayed runs
(runs/<stage>-<time>/events.jsonl) go through the very same handler as live events.

Before a launch, the selected stage's estimated time at the current settings (overrides
included) is shown under its description: engine.pipeline.estimate computes it from this machine's
speed profile, in a thread worker. When no profile is cached for this machine, the first
time the tab is shown with nothing running it is measured once in the background (a few
seconds; engine/backends/local/speed_profile.py), never while a stage runs.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import DataTable, Input, Label, ProgressBar, RichLog, Static
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from engine.pipeline.estimate import (
    EstimateError,
    cached_profiles,
    estimate_stage,
    measure_profiles,
)
from engine.pipeline.runner import list_runs, load_run_events, stage_status
from engine.run.events import (
    CheckpointSaved,
    LogLine,
    Metric,
    Progress,
    SampleProduced,
    StageFailed,
    StageFinished,
    StageStarted,
)
from engine.store.workspace import Workspace
from tui.common import CancelRequested, EngineEvent, LaunchRequested, focus_now, one_line, plain

STATE_STYLE = {
    "done": "green",
    "running": "bold cyan",
    "failed": "red",
    "cancelled": "yellow",
    "interrupted": "yellow",
    "not run": "dim",
    "not implemented": "dim italic",
}
LOSS = ("train/loss", "val/loss")
REDRAW_EVERY = 0.25  # seconds: charts redraw at most this often
MAX_REPLAY_LOG = 400
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


class MetricChart(PlotextPlot):
    """A plotext chart fed point by point; redraws on a timer, only when something changed."""

    def __init__(self, title: str, **kw) -> None:
        super().__init__(**kw)
        self.title = title
        self.series: dict[str, list[tuple[float, float]]] = {}
        self._dirty = True

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(REDRAW_EVERY, self._maybe_redraw)
        self._draw()

    def clear_series(self) -> None:
        self.series.clear()
        self._dirty = True

    def add_point(self, name: str, step: float, value: float) -> None:
        self.series.setdefault(name, []).append((step, value))
        self._dirty = True

    def prepend(self, points: dict[str, list[tuple[float, float]]]) -> None:
        for name, pts in points.items():
            self.series[name] = [*pts, *self.series.get(name, [])]
        self._dirty = True

    @property
    def points(self) -> int:
        return sum(len(v) for v in self.series.values())

    def _maybe_redraw(self) -> None:
        if self._dirty:
            self._draw()

    def _draw(self) -> None:
        self._dirty = False
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.title)
        for name, pts in self.series.items():
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            plt.plot(xs, ys, label=name, marker="braille")
        if not self.series:
            plt.xlabel("no points yet")
        self.refresh()


class LiveLog(RichLog):
    """RichLog that never keeps lines back: RichLog holds writes until it has learnt its
    width from a resize, and a log first laid out in a hidden tab could stay blank until
    the terminal was resized. Once it is shown with a width, what it held is written."""

    def _flush_if_sized(self) -> None:
        if not self._size_known and self.size.width > 0:
            self._size_known = True
            held = list(self._deferred_renders)
            self._deferred_renders.clear()
            for d in held:
                self.write(d.content, d.width, d.expand, d.shrink, d.scroll_end)

    def on_show(self) -> None:
        self.call_after_refresh(self._flush_if_sized)

    def write(self, *args, **kw):  # type: ignore[override]
        self._flush_if_sized()
        return super().write(*args, **kw)

    @property
    def pending(self) -> int:
        return len(self._deferred_renders)


def earlier_loss_points(ws: Workspace, stage: str, run_dir: str, before_step: float) -> dict:
    """Loss points of the runs this one resumed from (the same stage's earlier runs, newest
    first, each contributing the steps before the ones already shown), so the chart shows the
    whole curve of a checkpoint built across several runs."""
    out: dict[str, list[tuple[float, float]]] = {}
    current = Path(run_dir).name if run_dir else ""
    limit = before_step
    for run in reversed(list_runs(ws, stage)):
        if current and run.name >= current:
            continue
        pts = [
            e
            for e in load_run_events(run)
            if isinstance(e, Metric) and _is_loss(e.name) and e.step < limit
        ]
        if not pts:
            continue
        for e in pts:
            out.setdefault(e.name, []).append((e.step, e.value))
        limit = min(e.step for e in pts)
        if limit <= 1:
            break
    return {k: sorted(v) for k, v in out.items()}


def _is_loss(name: str) -> bool:
    return name in LOSS or name.endswith("/loss")


class StageTable(DataTable):
    BINDINGS = [Binding("enter", "select_cursor", "Launch", id="train.launch")]


class TrainPane(Vertical):
    DEFAULT_CSS = """
    TrainPane #stage-estimate {
        height: 1;
        padding: 0 1;
        color: $text-muted;
    }
    """
    BINDINGS = [
        Binding(
            "x",
            "cancel_stage",
            "Cancel run",
            id="train.cancel",
            tooltip="Stop the running stage (it keeps what it has done)",
        ),
        Binding(
            "r",
            "replay",
            "Replay",
            id="train.replay",
            tooltip="Show the selected stage's last run: log and charts",
        ),
        Binding(
            "o",
            "focus_overrides",
            "Overrides",
            id="train.overrides",
            tooltip="Type settings for the next launch, e.g. sft.steps=20",
        ),
    ]

    def __init__(self, workspace: Workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.statuses = []
        self.current: str | None = None  # stage whose events are on screen
        self.current_run = ""  # its run folder
        self._earlier_loaded = False  # the resumed-from runs' loss points are on the chart
        self._shown = False  # the tab has been shown (the speed is measured only then)
        self.speed_state = ""  # "" | "measuring" | "measured" | "failed: ..."
        self.estimate_text = ""  # what the estimate line says now
        self.estimate_for: tuple[str, str] | None = None  # (stage, overrides) it is for
        self._estimate_timer: Timer | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="train-top"):
            with Vertical(id="stage-col"):
                table = StageTable(id="stage-table", cursor_type="row")
                table.add_column("#", key="n", width=2)
                table.add_column("stage", key="stage", width=13)
                table.add_column("state", key="state", width=15)
                yield table
                yield Input(
                    placeholder="overrides: sft.steps=20 sft.lr=1e-4",
                    id="overrides",
                )
            with Vertical(id="chart-col"):
                yield MetricChart("loss", id="loss-chart")
                yield MetricChart("reward / win rate", id="metric-chart")
        with Horizontal(id="progress-row"):
            yield Label("idle", id="progress-label")
            yield ProgressBar(id="progress", show_eta=True)
        yield Static(id="stage-info", classes="status-line")
        yield Static(id="stage-estimate")
        yield LiveLog(id="log", max_lines=2000, wrap=True, markup=False, highlight=False)

    def on_mount(self) -> None:
        self.query_one("#metric-chart").display = False
        self.query_one("#stage-estimate").display = False
        if "engine.stages" in sys.modules:
            self.refresh_stages()
        else:  # the app loads the engine in a thread, then calls refresh_stages
            self.query_one("#stage-info", Static).update(Text("loading the engine…", style="dim"))

    @property
    def running(self) -> str | None:
        """What runs: the app holds it (one place)."""
        return getattr(self.app, "running_stage", None)

    def default_focus(self):
        return self.query_one("#stage-table", DataTable)

    def focus_default(self) -> None:
        focus_now(self.default_focus())

    def show_stopping(self) -> None:
        """Cancel was asked: say so on the stage's row at once."""
        name = self.running
        table = self.query_one("#stage-table", DataTable)
        if name and name in table.rows:
            table.update_cell(name, "state", Text("stopping…", style="bold yellow"))
        self.query_one("#progress-label", Label).update(
            Text(f"stopping {name}…", style="bold yellow")
        )

    # -- stages table --------------------------------------------------------
    def refresh_stages(self) -> None:
        try:
            self.statuses = stage_status(self.ws)
        except Exception as e:  # e.g. results/checkpoints.toml not UTF-8: say so, stay usable
            self.query_one("#stage-info", Static).update(
                plain(f"Could not read the stages' state: {e}", "red")
            )
            return
        table = self.query_one("#stage-table", DataTable)
        row = table.cursor_row
        table.clear()
        stopping = getattr(self.app, "stopping", False)
        for st in self.statuses:
            state = st.state
            if st.name == self.running:
                state = "stopping…" if stopping else "running"
            table.add_row(
                str(st.number),
                st.name,
                Text(state, style=STATE_STYLE.get(state, "bold yellow")),
                key=st.name,
            )
        if self.statuses:
            table.move_cursor(row=max(0, min(row, len(self.statuses) - 1)))
        self.show_info()

    def selected(self) -> str | None:
        table = self.query_one("#stage-table", DataTable)
        i = table.cursor_row
        return self.statuses[i].name if 0 <= i < len(self.statuses) else None

    @on(DataTable.RowHighlighted, "#stage-table")
    def show_info(self) -> None:
        name = self.selected()
        st = next((s for s in self.statuses if s.name == name), None)
        info = self.query_one("#stage-info", Static)
        if st is None:
            info.update("")
            return
        t = Text()
        t.append(f"{st.number}. {st.title}", style="bold")
        if st.outputs:
            t.append("  → " + ", ".join(st.outputs), style="green")
        ck = st.checkpoint
        if ck.get("sampler_path"):
            t.append(f"  checkpoint step {ck.get('step', '?')}: ", style="dim")
            t.append(one_line(str(ck["sampler_path"]), 60), style="dim")
        if st.message and st.state in ("failed", "interrupted", "cancelled"):
            t.append("\n")
            t.append_text(plain(st.message, STATE_STYLE.get(st.state, "")))
        info.update(t)
        self.request_estimate()

    # -- the estimate before launch -------------------------------------------
    def on_show(self) -> None:
        if not self._shown:
            self._shown = True
            self.request_estimate()

    @on(Input.Changed, "#overrides")
    def _overrides_changed(self) -> None:
        self.request_estimate()

    def request_estimate(self) -> None:
        """Estimate the selected stage at the current settings, off the event loop, once
        the keys and cursor moves of a burst have stopped: typing an override starts one
        estimate, not one per key (a thread worker runs to its end even when replaced)."""
        if self._estimate_timer is not None:
            self._estimate_timer.stop()
        self._estimate_timer = self.set_timer(ESTIMATE_AFTER, self._request_estimate_now)

    def _request_estimate_now(self) -> None:
        self._estimate_timer = None
        name = self.selected()
        if name is None or "engine.stages" not in sys.modules:
            return
        overrides = self.query_one("#overrides", Input).value
        may_measure = (
            self._shown
            and self.running is None
            and self.speed_state != "measuring"
            and not self.speed_state.startswith("failed")
        )
        self._estimate(name, overrides, may_measure)

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False)
    def _estimate(self, name: str, overrides: str, may_measure: bool) -> None:
        try:
            text, measure, why = self._estimate_line(name, overrides, may_measure)
        except Exception as e:  # an estimate must never take the tab down
            text, measure, why = f"no estimate: {type(e).__name__}: {e}", [], ""
        if get_current_worker().is_cancelled:
            return
        self.app.call_from_thread(self._show_estimate, name, overrides, text, measure, why)

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
        try:  # another role's model without a profile is priced at the policy's speed
            est = estimate_stage(name, cfg, self.ws, profiles)
        except EstimateError as e:
            return f"no estimate: {e}", measure, ""
        if est is None:
            return "runs on Tinker: its time depends on the service", [], ""
        assumed = list(est.assumptions)
        if est.upper_bound:
            assumed.append("every answer taken to run to max_tokens: an upper bound")
        return est.line(), measure, "\n".join(assumed)

    def _show_estimate(
        self, name: str, overrides: str, text: str, measure: list[str], why: str
    ) -> None:
        if measure and self.speed_state != "measuring" and self.running is None:
            self.speed_state = "measuring"
            self._measure(overrides, measure)
        if name != self.selected():
            return  # the cursor moved on; its own estimate is on the way
        self.estimate_text = text
        self.estimate_for = (name, overrides)
        line = self.query_one("#stage-estimate", Static)
        style = "italic" if text == MEASURING else ""
        line.update(Text(one_line(text, 300), style=style, no_wrap=True, overflow="ellipsis"))
        line.tooltip = why or None
        line.display = bool(text)

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
        self.request_estimate()

    def overrides(self) -> list[str]:
        return split_overrides(self.query_one("#overrides", Input).value)

    def launch_overrides(self, typed: str) -> list[str]:
        """What a launch would run with: the app's own overrides, then the typed ones."""
        return [*getattr(self.app, "default_overrides", []), *split_overrides(typed)]

    # -- actions -------------------------------------------------------------
    def action_launch(self) -> None:
        name = self.selected()
        if name:
            self.post_message(LaunchRequested(name, self.overrides(), source="train"))

    @on(DataTable.RowSelected, "#stage-table")
    def _row_selected(self) -> None:
        self.action_launch()

    @on(Input.Submitted, "#overrides")
    def _overrides_done(self) -> None:
        self.focus_default()

    def action_focus_overrides(self) -> None:
        self.query_one("#overrides", Input).focus()

    def action_cancel_stage(self) -> None:
        self.post_message(CancelRequested())

    def action_replay(self) -> None:
        name = self.selected()
        if name is None:
            return
        if self.running:
            self.app.notify_plain("A stage is running; replay when it ends.", severity="warning")
            return
        runs = list_runs(self.ws, name)
        if not runs:
            self.app.notify_plain(f"{name} has no past runs.", severity="warning")
            return
        self.replay(runs[-1])

    @work(thread=True, exclusive=True, group="replay")
    def replay(self, run_dir: Path) -> None:
        events = load_run_events(run_dir)
        self.app.call_from_thread(self._apply_replay, run_dir, events)

    def _apply_replay(self, run_dir: Path, events: list) -> None:
        self.reset_view()
        log = self.query_one("#log", RichLog)
        log.write(Text(f"replay of {self.ws.rel(run_dir)} ({len(events)} events)", style="bold"))
        logs = [e for e in events if isinstance(e, LogLine | SampleProduced)]
        skip = set(map(id, logs[:-MAX_REPLAY_LOG])) if len(logs) > MAX_REPLAY_LOG else set()
        if skip:
            log.write(Text(f"… {len(skip)} earlier log lines not shown", style="dim"))
        for ev in events:
            if id(ev) not in skip:
                self.handle(ev, replay=True)

    # -- events --------------------------------------------------------------
    def reset_view(self) -> None:
        self._earlier_loaded = False
        for chart in self.query(MetricChart):
            chart.clear_series()
        self.query_one("#metric-chart").display = False
        self.query_one("#log", RichLog).clear()
        bar = self.query_one("#progress", ProgressBar)
        bar.update(total=None, progress=0)
        self.query_one("#progress-label", Label).update("idle")

    def on_engine_event(self, message: EngineEvent) -> None:
        self.handle(message.event, replay=message.replay)

    def handle(self, ev, replay: bool = False) -> None:
        log = self.query_one("#log", RichLog)
        if isinstance(ev, StageStarted):
            if not replay:
                self.reset_view()
                self.refresh_stages()
            self.current = ev.stage
            self.current_run = ev.run_dir
            log.write(
                Text(
                    f"▶ {ev.stage}  {self.ws.rel(ev.run_dir) if ev.run_dir else ''}",
                    style="bold cyan",
                )
            )
        elif isinstance(ev, Metric):
            if _is_loss(ev.name):
                chart = self.query_one("#loss-chart", MetricChart)
                if not self._earlier_loaded and not chart.points and ev.step > 1 and self.current:
                    self._earlier_loaded = True  # a resumed run: show the steps before it too
                    with contextlib.suppress(OSError, ValueError):
                        chart.prepend(
                            earlier_loss_points(self.ws, self.current, self.current_run, ev.step)
                        )
                chart.add_point(ev.name, ev.step, ev.value)
            else:
                chart = self.query_one("#metric-chart", MetricChart)
                chart.display = True
                chart.add_point(ev.name, ev.step, ev.value)
        elif isinstance(ev, Progress):
            bar = self.query_one("#progress", ProgressBar)
            bar.update(total=ev.total or None, progress=ev.done)
            self.query_one("#progress-label", Label).update(
                Text(f"{one_line(ev.label or self.current or '', 28)} {ev.done}/{ev.total}")
            )
        elif isinstance(ev, LogLine):
            style = {"warning": "yellow", "error": "red"}.get(ev.level, "")
            log.write(plain(ev.message, style))
        elif isinstance(ev, SampleProduced):
            t = Text()
            t.append(f"{ev.source or 'sample'} ", style="cyan")
            t.append(one_line(ev.input, 40), style="dim")
            t.append(" → ")
            t.append(one_line(ev.output, 120))
            log.write(t)
        elif isinstance(ev, CheckpointSaved):
            log.write(Text(f"✓ checkpoint {ev.name} at step {ev.step}", style="green"))
        elif isinstance(ev, StageFinished):
            t = Text(f"✓ {ev.stage} done", style="bold green")
            if ev.summary:
                t.append("  ")
                t.append_text(plain(ev.summary))
            log.write(t)
            self.query_one("#progress-label", Label).update(Text(f"{ev.stage} done", style="green"))
            self._finish(replay)
        elif isinstance(ev, StageFailed):
            style = "yellow" if ev.cancelled else "bold red"
            t = Text(f"✗ {ev.stage} {'cancelled' if ev.cancelled else 'failed'}: ", style=style)
            t.append_text(plain(ev.message))
            log.write(t)
            self.query_one("#progress-label", Label).update(
                Text(f"{ev.stage} {'cancelled' if ev.cancelled else 'failed'}", style=style)
            )
            self._finish(replay)

    def _finish(self, replay: bool) -> None:
        if not replay:
            self.call_after_refresh(self.refresh_stages)  # after the app marks it ended
