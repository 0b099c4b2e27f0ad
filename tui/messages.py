"""The messages between the panes and the app: engine events down, requests up.

The app alone starts and stops stages and holds what runs; panes ask it with these messages
and learn what happens from the EngineEvent and StageState messages it sends them."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class EngineEvent(Message):
    """One engine event (engine.events.*), delivered to widgets as a Textual message.
    ``where``: a cross-validation's fold stage it comes from ("fold 2/5 · ditto")."""

    bubble = False

    def __init__(self, event: Any, *, replay: bool = False, where: str = "") -> None:
        super().__init__()
        self.event = event
        self.replay = replay
        self.where = where


class LaunchRequested(Message):
    """A pane asks the app to start a stage (the app alone decides and holds what runs)."""

    def __init__(
        self,
        stage: str,
        overrides: list[str] | None = None,
        source: str = "",
        workspace: Any = None,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.overrides = list(overrides or [])
        self.source = source
        self.workspace = workspace  # another view of the workspace (the Prompts tab's try)


class CancelRequested(Message):
    """A pane asks the app to stop the running stage."""


class FilesChanged(Message):
    """A pane read or wrote a workspace file others show (``what``: "demos", "synthetic"...);
    the app passes it down to every pane."""

    def __init__(self, *what: str) -> None:
        super().__init__()
        self.what = frozenset(what)


class RunState(Message):
    """The app to its panes: what runs now (None: nothing) and whether it was asked to stop;
    ``source``: the pane that asked for it ("train", "prompts", ...)."""

    bubble = False

    def __init__(self, running: str | None, stopping: bool = False, source: str = "") -> None:
        super().__init__()
        self.running = running
        self.stopping = stopping
        self.source = source
