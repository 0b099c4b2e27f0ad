"""What the Train tab's stage rows say: the engine's stage_status, rendered.

The engine decides each stage's state (its last result that completed, a later failed,
cancelled or interrupted attempt as a note; stages running in another process as running),
so `persona status` and this tab agree. It runs in a worker thread, polled while the tab is
on screen.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.pipeline.runner import StageStatus, stage_status
from engine.store.workspace import Workspace


@dataclass
class StageRow:
    status: StageStatus

    @property
    def name(self) -> str:
        return self.status.name

    @property
    def state(self) -> str:
        """The last completed result, or the attempt's state when none completed."""
        return self.status.state

    @property
    def note(self) -> str:
        """A later attempt that did not complete, in words."""
        return self.status.note

    def key(self) -> tuple[str, str, str, tuple[str, ...]]:
        """What, when it changes, the table must show again."""
        return (self.name, self.state, self.note, tuple(self.status.outputs))


def stage_rows(ws: Workspace) -> list[StageRow]:
    return [StageRow(st) for st in stage_status(ws)]
