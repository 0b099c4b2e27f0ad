"""Train tab: every stage with its state; enter launches, x cancels, r replays the last run.

The last row, crossval, is the cross-validation (``persona crossval``): selected, its cost
shows on the estimate line; enter starts or continues it on its screen (tui/crossval.py, also
ctrl+k), and while it runs the tab shows each fold stage as it shows any stage, placed as
"fold i/k · stage".

A live log, live curves (tui/train_charts.py: losses; rewards and win rates; the rest, with
legends, one at a time where they do not fit), a progress bar with ETA (from the run's real
rate), and the selected stage's estimated time before launch (tui/train_estimate.py).
Replayed runs (runs/<stage>-<time>/events.jsonl) go through the very same handler as live
events.

State comes down, requests go up: the app tells the tab what runs (RunState) and that files
changed (FilesChanged); the tab asks the app to launch or cancel (LaunchRequested,
CancelRequested). A stage run from another process shows as running from its marker: the
rows are read again every few seconds while the tab is on screen.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Label, ProgressBar, RichLog, Static

from engine.pipeline.runner import list_runs, load_run_events
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
from tui.dialogs import focus_now
from tui.messages import CancelRequested, EngineEvent, FilesChanged, LaunchRequested, RunState
from tui.stage_rows import StageRow, stage_rows
from tui.text import one_line, plain
from tui.train_charts import ChartPanel, MetricChart, earlier_loss_points, is_loss
from tui.train_estimate import StageEstimate, split_overrides

__all__ = ["MetricChart", "TrainPane", "split_overrides"]

STATE_STYLE = {
    "done": "green",
    "running": "bold cyan",
    "failed": "red",
    "cancelled": "yellow",
    "interrupted": "yellow",
    "not run": "dim",
    "not implemented": "dim italic",
}
MAX_REPLAY_LOG = 400
CROSSVAL = "crossval"
POLL_EVERY = 2.0  # seconds: how often the rows are read again while the tab is on screen


def train_rows(ws: Workspace) -> list[StageRow]:
    """The stages' rows, then the cross-validation's (engine.crossval.run.crossval_status)."""
    from engine.crossval.run import crossval_status

    cv = crossval_status(ws)
    return [*stage_rows(ws), StageRow(cv)]


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


class StageTable(DataTable):
    BINDINGS = [Binding("enter", "select_cursor", "Launch", id="train.launch")]


class TrainPane(Vertical):
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
        Binding(
            "c",
            "cycle_chart",
            "Chart",
            id="train.chart",
            tooltip="Show the next chart (loss, reward / win rate, other metrics)",
        ),
    ]

    def __init__(self, workspace: Workspace, default_overrides: list[str] | None = None, **kw):
        super().__init__(**kw)
        self.ws = workspace
        self.default_overrides = list(default_overrides or [])
        self.rows: list[StageRow] = []
        self.running: str | None = None  # what the app runs (RunState)
        self.stopping = False  # cancel asked, the stage has not ended yet
        self.current: str | None = None  # stage whose events are on screen
        self.current_run = ""  # its run folder
        self.where = ""  # the cross-validation's fold stage on screen ("fold 2/5 · ditto")
        self._earlier_loaded = False  # the resumed-from runs' loss points are on the chart
        self._on_screen = False

    def compose(self) -> ComposeResult:
        with Horizontal(id="train-top"):
            with Vertical(id="stage-col"):
                table = StageTable(id="stage-table", cursor_type="row")
                table.add_column("#", key="n", width=2)
                table.add_column("stage", key="stage", width=13)
                table.add_column("state", key="state", width=15)
                yield table
                yield Input(placeholder="overrides: sft.steps=20 sft.lr=1e-4", id="overrides")
            yield ChartPanel(id="chart-col")
        with Horizontal(id="progress-row"):
            yield Label("idle", id="progress-label")
            yield ProgressBar(id="progress", show_eta=True)
        yield Static(id="stage-info", classes="status-line")
        yield StageEstimate(self.ws, self.default_overrides, id="stage-estimate")
        yield LiveLog(id="log", max_lines=2000, wrap=True, markup=False, highlight=False)

    def on_mount(self) -> None:
        self.set_interval(POLL_EVERY, self._poll)
        if "engine.stages" in sys.modules:
            self.refresh_stages()
        else:  # the app loads the engine in a thread, then calls refresh_stages
            self.query_one("#stage-info", Static).update(Text("loading the engine…", style="dim"))

    @property
    def estimate(self) -> StageEstimate:
        return self.query_one(StageEstimate)

    @property
    def charts(self) -> ChartPanel:
        return self.query_one(ChartPanel)

    @property
    def statuses(self):
        return [r.status for r in self.rows]

    def default_focus(self):
        return self.query_one("#stage-table", DataTable)

    def focus_default(self) -> None:
        focus_now(self.default_focus())

    # -- state down ----------------------------------------------------------
    def on_run_state(self, message: RunState) -> None:
        was = self.running
        self.running, self.stopping = message.running, message.stopping
        self.estimate.running = message.running
        if message.running == CROSSVAL and was != CROSSVAL:
            self.reset_view()
            self.query_one("#log", RichLog).write(
                Text("▶ crossval  (ctrl+k: its plan, log and reports)", style="bold cyan")
            )
        if message.stopping and message.running:
            self.show_stopping()
        elif was != message.running:
            self.refresh_stages()

    def on_files_changed(self, message: FilesChanged) -> None:
        message.stop()
        self.estimate.request()  # accepted rows or demonstrations change what a stage does
        self.refresh_stages()

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
    def on_show(self) -> None:
        self._on_screen = True
        if not self.estimate.allowed:
            self.estimate.allowed = True
            self.estimate.request(self.selected())

    def on_hide(self) -> None:
        self._on_screen = False

    def _poll(self) -> None:
        if self._on_screen and "engine.stages" in sys.modules:
            self._read_rows()

    @work(thread=True, exclusive=True, group="stage-rows", exit_on_error=False)
    def _read_rows(self) -> None:
        try:
            rows = train_rows(self.ws)
        except Exception:  # refresh_stages on the event loop says what is wrong
            return
        self.app.call_from_thread(self._rows_read, rows)

    def _rows_read(self, rows: list[StageRow]) -> None:
        if [r.key() for r in rows] != [r.key() for r in self.rows]:
            self.show_rows(rows)

    def refresh_stages(self) -> None:
        try:
            rows = train_rows(self.ws)
        except Exception as e:  # e.g. results/checkpoints.toml not UTF-8: say so, stay usable
            self.query_one("#stage-info", Static).update(
                plain(f"Could not read the stages' state: {e}", "red")
            )
            return
        self.show_rows(rows)

    def show_rows(self, rows: list[StageRow]) -> None:
        self.rows = rows
        table = self.query_one("#stage-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for row in rows:
            state = row.state
            if row.name == self.running:
                state = "stopping…" if self.stopping else "running"
            text = Text(state, style=STATE_STYLE.get(state, "bold yellow"))
            if row.note and state == "done":
                text.append(" !", style="bold yellow")  # a later attempt did not complete
            number = "cv" if row.name == CROSSVAL else str(row.status.number)
            table.add_row(number, row.name, text, key=row.name)
        if rows:
            table.move_cursor(row=max(0, min(cursor, len(rows) - 1)))
        self.show_info()

    def selected(self) -> str | None:
        i = self.query_one("#stage-table", DataTable).cursor_row
        return self.rows[i].name if 0 <= i < len(self.rows) else None

    @on(DataTable.RowHighlighted, "#stage-table")
    def show_info(self) -> None:
        name = self.selected()
        row = next((r for r in self.rows if r.name == name), None)
        info = self.query_one("#stage-info", Static)
        if row is None:
            info.update("")
            return
        st = row.status
        t = Text()
        if name == CROSSVAL:
            info.update(self.crossval_info(row))
            self.estimate.request(name, self.query_one("#overrides", Input).value)
            self.call_after_refresh(self._cursor_in_view)  # the info's height moved the table
            return
        t.append(f"{st.number}. {st.title}", style="bold")
        if st.outputs:
            t.append("  → " + ", ".join(st.outputs), style="green")
        ck = st.checkpoint
        if ck.get("sampler_path"):
            t.append(f"  checkpoint step {ck.get('step', '?')}: ", style="dim")
            t.append(one_line(str(ck["sampler_path"]), 60), style="dim")
        if row.state == "running" and name != self.running:
            t.append("\nrunning in another process (from the command line?)", style="cyan")
        if row.note:
            t.append("\n")
            t.append_text(plain(row.note, "yellow" if row.state == "done" else "red"))
        info.update(t)
        self.estimate.request(name, self.query_one("#overrides", Input).value)

    def _cursor_in_view(self) -> None:
        table = self.query_one("#stage-table", DataTable)
        table.move_cursor(row=table.cursor_row)

    def crossval_info(self, row: StageRow) -> Text:
        """Two lines: what it is (and its report), then what enter does and where it stands."""
        st = row.status
        t = Text(st.title, style="bold")
        if st.outputs:  # results/crossval_report.md: the Compare tab's report view, k
            t.append(" · report: F5, p, k", style="green")
        here = self.running == CROSSVAL
        if row.state == "running" and not here:
            t.append("\nrunning in another process (from the command line?)", style="cyan")
        elif not here:
            t.append("\nenter: ", style="dim")
            t.append(
                {"unfinished": "continue", "not run": "start"}.get(row.state, "start or continue"),
                style="bold",
            )
            t.append(" · ctrl+k: plan, log, reports", style="dim")
        if st.message and row.state != "done":
            t.append(" · ")
            t.append_text(plain(st.message, "yellow"))
        return t

    @on(Input.Changed, "#overrides")
    def _overrides_changed(self) -> None:
        self.estimate.request(typed=self.query_one("#overrides", Input).value)

    def overrides(self) -> list[str]:
        return split_overrides(self.query_one("#overrides", Input).value)

    # -- actions -------------------------------------------------------------
    def action_launch(self) -> None:
        name = self.selected()
        if name == CROSSVAL:  # its screen plans it and starts it: the same code as ctrl+k
            from tui.crossval import open_crossval

            open_crossval(self.app, [*self.default_overrides, *self.overrides()], start=True)
        elif name:
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

    def action_cycle_chart(self) -> None:
        self.charts.cycle()

    def action_replay(self) -> None:
        name = self.selected()
        if name is None:
            return
        if self.running:
            self.notify("A stage is running; replay when it ends.", severity="warning")
            return
        if name == CROSSVAL:
            self.notify("The cross-validation's log and reports are on its screen (ctrl+k).")
            return
        runs = list_runs(self.ws, name)
        if not runs:
            self.notify(f"{name} has no past runs.", severity="warning", markup=False)
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
    def reset_view(self, keep_log: bool = False) -> None:
        self._earlier_loaded = False
        self.charts.clear()
        if not keep_log:
            self.query_one("#log", RichLog).clear()
        bar = self.query_one("#progress", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = False
        self.query_one("#progress-label", Label).update("idle")

    def on_engine_event(self, message: EngineEvent) -> None:
        self.handle(message.event, replay=message.replay, where=message.where)

    def handle(self, ev, replay: bool = False, where: str = "") -> None:
        """One event; ``where``: the cross-validation's fold stage it comes from."""
        log = self.query_one("#log", RichLog)
        self.where = where
        if isinstance(ev, StageStarted):
            if not replay:
                self.reset_view(keep_log=bool(where))  # a cross-validation keeps its log
                self.refresh_stages()
            # a fold's resumed stage: its earlier losses are in the fold, not shown
            self._earlier_loaded = bool(where)
            self.current = ev.stage
            self.current_run = ev.run_dir
            run = self.ws.rel(ev.run_dir) if ev.run_dir else ""
            log.write(Text(f"▶ {where or ev.stage}  {run}", style="bold cyan"))
            if where:
                self.query_one("#progress-label", Label).update(Text(where))
        elif isinstance(ev, Metric):
            self._metric(ev)
        elif isinstance(ev, Progress):
            bar = self.query_one("#progress", ProgressBar)
            bar.display = True
            bar.update(total=ev.total or None, progress=ev.done)
            what = one_line(ev.label or self.current or "", 28)
            self.query_one("#progress-label", Label).update(
                Text((f"{where} · " if where else "") + f"{what} {ev.done}/{ev.total}")
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
        elif isinstance(ev, StageFinished | StageFailed):
            self._ended(ev, replay)

    def _metric(self, ev: Metric) -> None:
        charts = self.charts
        if is_loss(ev.name) and not self._earlier_loaded and ev.step > 1 and self.current:
            chart = charts.chart("loss")
            if not chart.points:
                self._earlier_loaded = True  # a resumed run: show the steps before it too
                with contextlib.suppress(OSError, ValueError):
                    chart.prepend(
                        earlier_loss_points(self.ws, self.current, self.current_run, ev.step)
                    )
        charts.add(ev.name, ev.step, ev.value)

    def _ended(self, ev: StageFinished | StageFailed, replay: bool) -> None:
        """The run ended: say how, and take its progress bar (and ETA) off the screen."""
        log = self.query_one("#log", RichLog)
        bar = self.query_one("#progress", ProgressBar)
        label = self.query_one("#progress-label", Label)
        name = self.where or ev.stage
        if isinstance(ev, StageFinished):
            t = Text(f"✓ {name} done", style="bold green")
            if ev.summary:
                t.append("  ")
                t.append_text(plain(ev.summary))
            log.write(t)
            label.update(Text(f"{name} done", style="green"))
        else:
            word = "cancelled" if ev.cancelled else "failed"
            style = "yellow" if ev.cancelled else "bold red"
            t = Text(f"✗ {name} {word}: ", style=style)
            t.append_text(plain(ev.message))
            log.write(t)
            at = f" at {bar.percentage:.0%}" if bar.total and bar.percentage is not None else ""
            label.update(Text(f"{name} {word}{at}", style=style))
        bar.display = False
        if not replay:
            self.call_after_refresh(self.refresh_stages)  # after the app marks it ended
