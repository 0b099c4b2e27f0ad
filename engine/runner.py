"""Run a stage: a run folder, a config snapshot, events.jsonl, listeners, cancel, status.

The TUI and the CLI both use this:

    runner = Runner(workspace, listeners=[print])
    async for event in runner.run_stage("sft", overrides=["sft.steps=20"]):
        ...                      # or just: final = await runner.run("sft")
    runner.cancel()              # from anywhere (thread-safe); the stage stops within one step

``load_run_events(run_dir)`` replays a finished or crashed run, ``stage_status(ws)``
summarizes every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_json, atomic_write_toml
from engine.checkpoints import read_registry
from engine.config import ConfigError, redact, snapshot
from engine.context import StageCancelled, StageContext, default_service_factory
from engine.errors import PersonaError
from engine.events import (
    Event,
    LogLine,
    Metric,
    StageFailed,
    StageFinished,
    StageStarted,
    event_from_dict,
    event_to_dict,
)
from engine.workspace import Workspace

Listener = Callable[[Event], Any]
RUNNING_MARKER = "running.json"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_run_dir(workspace: Workspace, stage: str) -> Path:
    workspace.runs_dir.mkdir(parents=True, exist_ok=True)
    base = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = workspace.runs_dir / base
    n = 2
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path = workspace.runs_dir / f"{base}-{n}"
            n += 1


def _failure_message(stage: str, exc: BaseException, run_dir: Path, ws: Workspace) -> str:
    if isinstance(exc, PersonaError):  # written for people: shown as it is
        return str(exc)
    if isinstance(exc, ImportError) and "engine.backends" in str(exc):
        return f"The backend is not available (engine.backends failed to import: {exc}). Reinstall with `make install`."
    text = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, MemoryError):
        text += ". Out of memory: lower sft.batch_size or sft.max_length, or sampling.max_tokens."
    return f"{stage} failed: {text}. Details: {ws.rel(run_dir / 'events.jsonl')}"


class Runner:
    """Runs one stage at a time for a workspace and forwards its events."""

    def __init__(
        self,
        workspace: Workspace | str | Path,
        *,
        listeners: Iterable[Listener] = (),
        service_factory: Callable[..., Any] | None = None,
        stages: dict[str, Any] | None = None,
    ) -> None:
        self.workspace = (
            workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
        )
        self.listeners: list[Listener] = list(listeners)
        self.service_factory = service_factory or default_service_factory
        self._stages = stages
        self._cancel = threading.Event()
        self.running: str | None = None

    # -- listeners / control -------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def cancel(self) -> None:
        """Ask the running stage to stop (it finishes the step in flight, saves, and ends)."""
        self._cancel.set()

    @property
    def stages(self) -> dict[str, Any]:
        if self._stages is None:
            from engine.stages import STAGES

            self._stages = STAGES
        return self._stages

    async def run(
        self,
        name: str,
        overrides: list[str] | dict[str, Any] | None = None,
        backend: str | None = None,
    ) -> Event:
        """Run to the end; return the final StageFinished or StageFailed."""
        last: Event | None = None
        async for ev in self.run_stage(name, overrides, backend):
            last = ev
        assert last is not None
        return last

    async def run_stage(
        self,
        name: str,
        overrides: list[str] | dict[str, Any] | None = None,
        backend: str | None = None,
    ) -> AsyncIterator[Event]:
        """Yield every event of one run of stage ``name`` (the last is StageFinished or StageFailed)."""
        ws = self.workspace
        if self.running is not None:
            yield StageFailed(
                stage=name,
                message=f"{self.running} is still running; wait for it or cancel it first.",
            )
            return
        self._cancel = threading.Event()
        spec = self.stages.get(name)
        if spec is None:
            known = ", ".join(self.stages)
            yield StageFailed(stage=name, message=f"Unknown stage {name!r}. Stages: {known}")
            return
        if getattr(spec, "run", None) is None:
            yield StageFailed(stage=name, message=f"Stage {name!r} is not implemented yet.")
            return
        try:
            cfg = ws.config(overrides, backend)
        except ConfigError as e:
            yield StageFailed(stage=name, message=str(e))
            return
        busy = _live_run(ws, name)
        if busy is not None:
            yield StageFailed(
                stage=name,
                message=f"{name} is already running ({ws.rel(busy)}). Wait for it or stop it first.",
            )
            return
        secrets = ws.secrets()
        try:
            run_dir = new_run_dir(ws, name)
            atomic_write_toml(run_dir / "config.toml", snapshot(cfg, secrets))
            atomic_write_json(
                run_dir / RUNNING_MARKER, {"pid": os.getpid(), "stage": name, "started": time.time()}
            )
        except OSError as e:  # disk full, permissions: say so, and leave nothing marked running
            yield StageFailed(stage=name, message=f"cannot create the run folder under {ws.rel(ws.runs_dir)}: {e}")
            return
        self.running = name
        ctx = StageContext(
            workspace=ws,
            config=cfg,
            stage=name,
            run_dir=run_dir,
            secrets=secrets,
            service_factory=self.service_factory,
            cancel_event=self._cancel,
        )
        listeners = list(self.listeners)
        wandb_listener = None
        if cfg.wandb.project.strip():
            from engine.wandb_logger import WandbListener

            wandb_listener = WandbListener(cfg, name, run_dir, secrets)
            listeners.append(wandb_listener)

        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        events_file = open(run_dir / "events.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

        async def emit(ev: Event) -> None:
            d = redact(event_to_dict(ev), secrets)
            line = json.dumps(d, ensure_ascii=False) + "\n"
            events_file.write(line)
            events_file.flush()
            if isinstance(ev, Metric):
                metrics_file.write(line)
                metrics_file.flush()
            ev = event_from_dict(d)
            for cb in listeners:
                try:
                    r = cb(ev)
                    if inspect.isawaitable(r):
                        await r
                except Exception as e:  # a broken listener must not kill the stage
                    events_file.write(
                        json.dumps(event_to_dict(LogLine(f"listener error: {e}", "warning"))) + "\n"
                    )
            await queue.put(ev)

        async def drive() -> None:
            final: Event | None = None
            try:
                await emit(StageStarted(stage=name, run_dir=str(run_dir)))
                if wandb_listener is not None and wandb_listener.error:
                    await emit(LogLine(wandb_listener.error, "warning"))
                agen = spec.run(ctx)
                try:
                    async for ev in agen:
                        if isinstance(ev, StageFinished | StageFailed):
                            final = ev
                            break
                        await emit(ev)
                finally:
                    await agen.aclose()
                if final is None:
                    final = StageFinished(stage=name)
            except StageCancelled:
                final = StageFailed(
                    stage=name,
                    cancelled=True,
                    message=f"{name} was cancelled. Files are consistent; run it again to "
                    + (
                        "resume from the last checkpoint."
                        if getattr(spec, "trains", False)
                        else "start over."
                    ),
                )
            except asyncio.CancelledError:
                final = StageFailed(stage=name, cancelled=True, message=f"{name} was stopped.")
                await emit(final)
                raise
            except Exception as e:
                if not isinstance(e, PersonaError):
                    await emit(LogLine("".join(traceback.format_exception(e)).rstrip(), "error"))
                final = StageFailed(stage=name, message=_failure_message(name, e, run_dir, ws))
            await emit(final)

        task = asyncio.create_task(drive(), name=f"persona-stage-{name}")
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            while True:
                ev = await queue.get()
                if ev is None:
                    break
                yield ev
            await task
        finally:
            if not task.done():  # the consumer went away: stop the stage
                self._cancel.set()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await _close_service(ctx)
            events_file.close()
            metrics_file.close()
            if wandb_listener is not None:
                wandb_listener.close()
            with contextlib.suppress(FileNotFoundError):
                (run_dir / RUNNING_MARKER).unlink()
            self.running = None


async def _close_service(ctx: StageContext) -> None:
    """Free the run's service client (the local one holds models and a worker thread)."""
    svc, ctx._service = ctx._service, None
    close = getattr(svc, "close", None)
    if close is None:
        return
    with contextlib.suppress(Exception):
        r = await asyncio.to_thread(close, "success")  # tinker requires a status
        if inspect.isawaitable(r):
            await r


# -- replay and status ----------------------------------------------------------


def _parse_event(line: bytes | str) -> Event | None:
    line = line.strip()
    if not line:
        return None
    try:
        return event_from_dict(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


def load_run_events(run_dir: str | Path) -> list[Event]:
    """Every event of a run, in order; a half-written last line (a crash) is skipped."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    parsed = (_parse_event(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [e for e in parsed if e is not None]


def last_run_event(run_dir: str | Path, block: int = 65536) -> Event | None:
    """The last event ``load_run_events`` would give, read from the end of the file: status
    checks stay cheap however long a run's log grows."""
    try:
        f = open(Path(run_dir) / "events.jsonl", "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with f:
        pos = f.seek(0, os.SEEK_END)
        head = b""  # a line cut by the block boundary, completed by the next block back
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + head).split(b"\n")
            head = lines.pop(0) if pos > 0 else b""
            for line in reversed(lines):
                event = _parse_event(line)
                if event is not None:
                    return event
        return _parse_event(head)


def _is_run_of(run: Path, stage: str) -> bool:
    rest = run.name[len(stage) + 1 :] if run.name.startswith(stage + "-") else ""
    return rest[:1].isdigit()


def list_runs(workspace: Workspace, stage: str | None = None) -> list[Path]:
    """Run folders, oldest first (optionally for one stage)."""
    if not workspace.runs_dir.exists():
        return []
    runs = [
        p
        for p in workspace.runs_dir.iterdir()
        if p.is_dir()
        and (p / "events.jsonl").exists()
        and (stage is None or _is_run_of(p, stage))
    ]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))


def _marker_pid(run: Path) -> int | None:
    """The pid in a run's running marker; None without a readable marker."""
    marker = run / RUNNING_MARKER
    if not marker.exists():
        return None
    try:
        return int(json.loads(marker.read_text()).get("pid", 0))
    except (ValueError, json.JSONDecodeError):
        return None


def _live_run(ws: Workspace, stage: str) -> Path | None:
    for run in list_runs(ws, stage):
        pid = _marker_pid(run)
        if pid is not None and _pid_alive(pid) and pid != os.getpid():
            return run
    return None


@dataclass
class StageStatus:
    name: str
    number: int
    title: str
    implemented: bool
    state: str  # "not run" | "running" | "done" | "failed" | "cancelled" | "interrupted" | "not implemented"
    outputs: list[str] = field(default_factory=list)  # existing output files, workspace-relative
    run_dir: str = ""
    message: str = ""  # failure message or finish summary
    checkpoint: dict[str, Any] = field(default_factory=dict)
    finished_at: float | None = None


def run_state(run_dir: Path) -> tuple[str, str, float | None]:
    """(state, message, ts) of one run folder."""
    last = last_run_event(run_dir)
    if isinstance(last, StageFinished):
        return "done", last.summary, last.ts
    if isinstance(last, StageFailed):
        return ("cancelled" if last.cancelled else "failed"), last.message, last.ts
    if _pid_alive(_marker_pid(run_dir) or 0):
        return "running", "", None
    return (
        "interrupted",
        "The run stopped without finishing (killed or crashed); run it again to resume.",
        None,
    )


def stage_status(workspace: Workspace | str | Path) -> list[StageStatus]:
    from engine.stages import STAGES

    ws = workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
    registry = read_registry(ws.results_dir)
    all_runs = list_runs(ws)  # one listing for every stage
    out = []
    for name, spec in STAGES.items():
        outputs = [ws.rel(p) for p in spec.output_paths(ws) if p.exists()]
        st = StageStatus(
            name=name,
            number=spec.number,
            title=spec.title,
            implemented=spec.run is not None,
            state="not run" if spec.run is not None else "not implemented",
            outputs=outputs,
            checkpoint=dict(registry.get(name, {})),
        )
        runs = [r for r in all_runs if _is_run_of(r, name)]
        if runs:
            state, msg, ts = run_state(runs[-1])
            st.state, st.message, st.finished_at, st.run_dir = state, msg, ts, ws.rel(runs[-1])
        elif spec.run is not None and name == "demos" and outputs:
            st.state = "done"
        out.append(st)
    return out
