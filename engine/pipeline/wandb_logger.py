"""Send a run's metrics to wandb when ``[wandb] project`` is set (offline mode without a key).

wandb is imported only when a project is configured. The key is passed through the process
environment of this process only, never written to a file by Persona.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from engine.run.events import Event, Metric, StageFailed, StageFinished
from engine.store.config import PersonaConfig, snapshot


class WandbListener:
    def __init__(
        self, cfg: PersonaConfig, stage: str, run_dir: Path, secrets: dict[str, str]
    ) -> None:
        self._run = None
        self.error = ""  # why wandb is off, shown once as a warning by the runner
        w = cfg.wandb
        try:
            import wandb

            key = secrets.get("WANDB_API_KEY", "")
            mode = "online" if key else "offline"
            if key:
                os.environ["WANDB_API_KEY"] = key
            # bounded like the Tinker connection: with a key and no network, wandb would
            # otherwise retry for minutes before the stage starts
            limit = cfg.backend.connect_timeout
            self._run = wandb.init(
                project=w.project,
                entity=w.entity or None,
                name=run_dir.name,
                group=stage,
                dir=str(run_dir),
                mode=os.environ.get("WANDB_MODE", mode),
                config=snapshot(cfg, secrets),
                reinit="finish_previous",
                settings=wandb.Settings(
                    init_timeout=limit,
                    login_timeout=limit,
                    x_graphql_timeout_seconds=limit,
                    x_graphql_retry_max=1,
                ),
            )
        except Exception as e:  # wandb is optional: never fail the stage for it
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
            self.error = (
                f"wandb disabled: {first}; the metrics stay in {run_dir.name}/metrics.jsonl "
                f"(wandb waits at most backend.connect_timeout = {cfg.backend.connect_timeout:g}"
                " s; WANDB_MODE=offline logs them offline)"
            )

    def __call__(self, event: Event) -> Any:
        if self._run is None:
            return None
        if isinstance(event, Metric):
            # metrics of one run interleave steps (val at 0, train at 1...): log the step as a value
            self._run.log({event.name: event.value, "step": event.step})
        elif isinstance(event, StageFinished | StageFailed):
            with contextlib.suppress(Exception):
                self._run.summary["status"] = (
                    "finished"
                    if isinstance(event, StageFinished)
                    else ("cancelled" if event.cancelled else "failed")
                )
        return None

    def close(self, exit_code: int = 0) -> None:
        if self._run is not None:
            with contextlib.suppress(Exception):
                self._run.finish(exit_code=exit_code)
            self._run = None
