"""What the Train tab's stage rows say: each stage's last result that completed, with a later
failed, cancelled or interrupted attempt as a note (a failed rerun does not relabel finished
work), and stages running in another process (their running marker) as running.

Read from the engine's run folders (engine.runner.stage_status, list_runs, run_state); it
runs in a worker thread, polled while the tab is on screen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.pipeline.runner import StageStatus, list_runs, run_state, stage_status
from engine.store.workspace import Workspace

UNFINISHED = ("failed", "cancelled", "interrupted")


@dataclass
class StageRow:
    status: StageStatus
    state: str  # what the row says: the last completed result, or the attempt's state
    note: str = ""  # a later attempt that did not complete, in words
    done_at: float | None = None  # when the result shown completed

    @property
    def name(self) -> str:
        return self.status.name

    def key(self) -> tuple[str, str, str, tuple[str, ...]]:
        """What, when it changes, the table must show again."""
        return (self.name, self.state, self.note, tuple(self.status.outputs))


def _when(ts: float | None) -> str:
    return time.strftime("%H:%M", time.localtime(ts)) if ts else ""


def _last_done(ws: Workspace, name: str) -> float | None:
    """When the stage's newest completed run finished (None: none completed)."""
    for run in reversed(list_runs(ws, name)[:-1]):
        state, _msg, ts = run_state(run)
        if state == "done":
            return ts or run.stat().st_mtime
    return None


def stage_rows(ws: Workspace) -> list[StageRow]:
    rows = []
    done_at: dict[str, float] = {}  # stage -> when its result shown completed
    for st in stage_status(ws):
        row = StageRow(st, st.state)
        if st.state == "done":
            row.done_at = st.finished_at
        elif st.state in UNFINISHED:
            attempt = (
                f"the last attempt{(' at ' + _when(st.finished_at)) if st.finished_at else ''}"
            )
            row.note = f"{attempt} {st.state}: {st.message}".rstrip(": ")
            row.done_at = _last_done(ws, st.name)
            if row.done_at is not None:
                row.state = "done"  # the finished result still stands
            else:
                since = [
                    s
                    for s, t in done_at.items()
                    if st.finished_at is not None and t and t > st.finished_at
                ]
                if since:
                    row.note += f" ({', '.join(since)} ran since: try again)"
        if row.done_at and row.state == "done":
            done_at[st.name] = row.done_at
        rows.append(row)
    return rows
