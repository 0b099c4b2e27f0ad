"""What a stage gets: the workspace, its config, its run folder, a service client, a cancel flag."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import PersonaError
from engine.store.settings import PersonaConfig
from engine.store.split import Split, workspace_split
from engine.store.workspace import Workspace


class StageCancelled(Exception):
    """Raised by ``StageContext.check_cancel`` once the person has asked the stage to stop."""


class StageError(PersonaError):
    """A failure with a message a person can act on (shown as is, no traceback)."""


def default_service_factory(backend: str, *, checkpoint_dir: Path, env: dict[str, str]) -> Any:
    from engine.backends import make_service_client  # imported late: the backend is heavy

    return make_service_client(backend, checkpoint_dir=checkpoint_dir, env=env)


@dataclass
class StageContext:
    workspace: Workspace
    config: PersonaConfig
    stage: str
    run_dir: Path
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    service_factory: Callable[..., Any] = default_service_factory
    cancel_event: threading.Event = field(default_factory=threading.Event)
    _service: Any = field(default=None, repr=False)

    # -- config helpers ------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.config.backend.name

    def model(self, role: str) -> str:
        return self.config.model(role)

    def split(self) -> Split:
        """The held-out split (recorded in data/holdout.json on first use). Training stages
        take ``split().train`` and nothing else from data/data.json."""
        return workspace_split(self.workspace, self.config.data)

    # -- backend -------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def service_client(self) -> Any:
        """One service client per run (so checkpoints land in this run's folder)."""
        if self._service is None:
            self._service = self.service_factory(
                self.backend, checkpoint_dir=self.checkpoint_dir, env=dict(self.secrets)
            )
        return self._service

    # -- cancel --------------------------------------------------------------
    def check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise StageCancelled()
