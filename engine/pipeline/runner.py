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

from engine.errors import PersonaError
from engine.run.context import StageCancelled, StageContext, default_service_factory
from engine.run.events import (
    CheckpointSaved,
    Event,
    LogLine,
    Metric,
    StageFailed,
    StageFinished,
    StageStarted,
    event_from_dict,
    event_to_dict,
)
from engine.store.atomic import atomic_write_json, atomic_write_toml, check_writable, pid_alive
from engine.store.checkpoint_retention import disk_usage, prune_checkpoints
from engine.store.checkpoints import load_registry, read_registry, require_registry
from engine.store.config import ConfigError, redact, snapshot
from engine.store.settings import PersonaConfig
from engine.store.workspace import RESULT_FILES, Workspace, WorkspaceError

Listener = Callable[[Event], Any]
RUNNING_MARKER = "running.json"


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if unknown."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # no such process, no psutil, no permission
        return None


def _marker_is_live(marker: dict[str, Any]) -> bool:
    """The process that wrote a running marker is still that process: alive, and (when the
    marker records it) started at the same time, so a reused pid does not count."""
    try:
        pid = int(marker.get("pid", 0))
    except (TypeError, ValueError):
        return False
    if not pid_alive(pid):
        return False
    recorded = marker.get("pid_started")
    if recorded is None:  # an old marker: fall back to the command line
        try:
            import psutil

            cmdline = " ".join(psutil.Process(pid).cmdline())
        except Exception:
            return True
        return any(k in cmdline for k in ("persona", "engine.cli", "tui"))
    now = _process_started(pid)
    return now is None or abs(now - float(recorded)) < 2.0


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


# -- preflight ------------------------------------------------------------------------

# The files a stage reads that an earlier stage writes, checked before a run folder is
# made. A StageSpec may carry its own ``inputs`` (workspace-relative paths) or a
# ``preflight(workspace, config)`` hook raising a PersonaError; this table covers the
# stages whose specs do not yet.
DEFAULT_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "synth-outputs": ((f"results/{RESULT_FILES['synth-inputs']}", "synth-inputs"),),
    "sft": ((f"results/{RESULT_FILES['synth-outputs']}", "synth-outputs"),),
    "rlaif": ((f"results/{RESULT_FILES['rl-prompts']}", "rl-prompts"),),
}

# The entries of results/checkpoints.toml each stage reads (None: every entry). An unreadable
# registry, or one of these entries with a wrong type, stops the stage before it starts: a
# stage that cannot see a checkpoint would train again from scratch, fall back to the base
# judge or evaluate fewer methods, and then write over what was there.
REGISTRY_READS: dict[str, tuple[str, ...] | None] = {
    "sft": ("sft",),
    "reward-model": ("reward-model",),
    "rlaif": ("rlaif", "sft", "reward-model"),
    "ditto": ("ditto", "sft-demos"),
    "evaluate": None,
}

# The stages that ask for the held-out split (data/holdout.json checked against the demos).
SPLIT_STAGES = frozenset(
    {"synth-inputs", "sft", "reward-model", "rl-prompts", "rlaif", "ditto", "evaluate"}
)


@dataclass
class Plan:
    """What preflight settled: the stage, its checked config and the secrets."""

    name: str
    spec: Any
    config: PersonaConfig
    secrets: dict[str, str]
    warnings: list[str] = field(default_factory=list)  # logged once the run has started


def preflight(
    ws: Workspace,
    stages: dict[str, Any],
    name: str,
    overrides: list[str] | dict[str, Any] | None,
    backend: str | None,
) -> Plan | StageFailed:
    """Everything that can refuse a run before anything is written."""
    spec = stages.get(name)
    if spec is None:
        return StageFailed(
            stage=name, message=f"Unknown stage {name!r}. Stages: {', '.join(stages)}"
        )
    if getattr(spec, "run", None) is None:
        return StageFailed(stage=name, message=f"Stage {name!r} is not implemented yet.")
    try:
        cfg = ws.config(overrides, backend)
    except ConfigError as e:
        return StageFailed(stage=name, message=str(e))
    busy = _live_run(ws, name)
    if busy is not None:
        return StageFailed(
            stage=name,
            message=f"{name} is already running ({ws.rel(busy)}). Wait for it or stop it first.",
        )
    for rel, producer in DEFAULT_INPUTS.get(name, ()):
        if not (ws.root / rel).exists():
            hint = f": run `persona run {producer}` first" if producer else ""
            return StageFailed(stage=name, message=f"{rel} not found{hint}.")
    try:
        for folder in (ws.results_dir, ws.runs_dir):  # full or read-only: now, not at the end
            check_writable(folder)
        _check_setting_inputs(ws, cfg, name)
        _check_split(ws, cfg, name)
        warnings = _check_registry(ws, name)
    except PersonaError as e:
        return StageFailed(stage=name, message=str(e))
    return Plan(name=name, spec=spec, config=cfg, secrets=ws.secrets(), warnings=warnings)


def _check_registry(ws: Workspace, name: str) -> list[str]:
    """Raise RegistryError when the stage reads an entry it cannot use; return the problems
    of the entries it does not read (they are kept as written, and named in its log)."""
    if name not in REGISTRY_READS:
        return []
    read = require_registry(ws.results_dir, REGISTRY_READS[name])
    return [f"{msg} (kept as written)" for msg in read.problems.values()]


def _check_setting_inputs(ws: Workspace, cfg: PersonaConfig, name: str) -> None:
    """The inputs that depend on settings (DEFAULT_INPUTS has the fixed ones): reward-model's
    judge needs training pairs, or outputs to be checked on."""
    if name != "reward-model":
        return
    rm = cfg.reward_model

    def have(stage: str) -> bool:
        return ws.result(RESULT_FILES[stage]).exists()

    if rm.validate_only:
        for stage in ("baseline", "sft"):
            if not have(stage):
                raise PersonaError(
                    f"results/{RESULT_FILES[stage]} not found: run `persona run {stage}` first "
                    "(reward_model.validate_only checks the judge on baseline vs SFT outputs)."
                )
    elif (
        rm.train
        and not rm.dataset.strip()
        and not (rm.own_pairs and (have("baseline") or have("prompting")))
    ):
        raise PersonaError(
            "No judge training data: run `persona run baseline` and `persona run prompting` "
            "(your own pairs), or point reward_model.dataset at a Preference-Collection file, "
            "or set reward_model.train = false to use the base judge."
        )


def _check_split(ws: Workspace, cfg: PersonaConfig, name: str) -> None:
    """A data/holdout.json entry that matches no demonstration stops the stages that use the
    split (engine/store/split.py raises, naming it); unreadable demos are left to the stage."""
    if name not in SPLIT_STAGES:
        return
    from engine.store.split import workspace_split

    try:
        ws.load_demos()
    except (WorkspaceError, OSError):
        return
    workspace_split(ws, cfg.data, record=False)


# -- the recorder: owns the run folder ---------------------------------------------------


class RunRecorder:
    """One run folder: config snapshot, events.jsonl, metrics.jsonl, the running marker.

    Every event passes through ``record``, which redacts secrets, writes it and returns the
    event as written (what listeners see). ``close`` removes the marker, whatever happened."""

    def __init__(
        self, ws: Workspace, stage: str, config: PersonaConfig, secrets: dict[str, str]
    ) -> None:
        self.ws = ws
        self.stage = stage
        self.config = config
        self.secrets = secrets
        self.run_dir: Path | None = None
        self._events: Any = None
        self._metrics: Any = None

    def open(self) -> Path:
        """Create the folder, snapshot and marker; on OSError nothing is left marked running."""
        run_dir = new_run_dir(self.ws, self.stage)
        self.run_dir = run_dir
        atomic_write_toml(run_dir / "config.toml", snapshot(self.config, self.secrets))
        self._events = open(run_dir / "events.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        pid = os.getpid()
        atomic_write_json(
            run_dir / RUNNING_MARKER,
            {
                "pid": pid,
                "pid_started": _process_started(pid),
                "stage": self.stage,
                "started": time.time(),
            },
        )
        return run_dir

    def record(self, ev: Event) -> Event:
        d = redact(event_to_dict(ev), self.secrets)
        line = json.dumps(d, ensure_ascii=False) + "\n"
        if self._events is not None:
            self._events.write(line)
            self._events.flush()
        if isinstance(ev, Metric) and self._metrics is not None:
            self._metrics.write(line)
            self._metrics.flush()
        return event_from_dict(d)

    def prune_checkpoints(self) -> None:
        """Keep the last ``runs.keep_checkpoints`` periodic checkpoints and the final one."""
        if self.run_dir is None:
            return
        read = load_registry(self.ws.results_dir)
        if read.error or read.problems:  # what it protects is unknown: remove nothing
            return
        protect = [
            v for entry in read.entries.values() for k, v in entry.items() if k.endswith("_path")
        ]
        prune_checkpoints(self.run_dir / "checkpoints", self.config.runs.keep_checkpoints, protect)

    def close(self) -> None:
        for f in (self._events, self._metrics):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._events = self._metrics = None
        if self.run_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / RUNNING_MARKER).unlink()


def _service_outcome(final: Event | None) -> tuple[str, str | None]:
    """The status tinker's ``close`` wants for a run that ended with ``final``."""
    if isinstance(final, StageFinished):
        return "success", None
    if isinstance(final, StageFailed):
        return ("interrupted" if final.cancelled else "errored"), final.message[:500]
    return "interrupted", "the run was stopped"


class Runner:
    """Runs one stage at a time for a workspace and forwards its events.

    ``run_stage`` is three rooms: ``preflight`` (refuses before anything is written), a
    ``RunRecorder`` (the run folder) and the driver (runs the stage, fans events out to the
    listeners and to the caller, closes the service with the run's real outcome)."""

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
        self._recorder: RunRecorder | None = None

    # -- listeners / control -------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def cancel(self) -> None:
        """Ask the running stage to stop (it finishes the step in flight, saves, and ends)."""
        self._cancel.set()

    def abandon(self, message: str) -> None:
        """Quit now (a second Ctrl+C): end the run's log with a cancelled final event and
        remove the running marker, so the files read consistently after ``os._exit``.
        Results files are written atomically: each holds its old or its new content."""
        recorder, name = self._recorder, self.running
        if recorder is None or name is None:
            return
        with contextlib.suppress(Exception):
            recorder.record(StageFailed(stage=name, cancelled=True, message=message))
        recorder.close()

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

    def _factory_for(self, plan: Plan, run_dir: Path) -> Callable[..., Any]:
        """The service factory of one run: the default one gets the run's settings
        (connect timeout, metadata, local threads and dtype)."""
        if self.service_factory is not default_service_factory:
            return self.service_factory
        cfg = plan.config
        metadata = {
            "stage": plan.name,
            "workspace": self.workspace.root.name,
            "run": run_dir.name,
        }

        def factory(backend: str, *, checkpoint_dir: Path, env: dict[str, str]) -> Any:
            from engine.backends import make_service_client

            return make_service_client(
                backend,
                checkpoint_dir=checkpoint_dir,
                env=env,
                connect_timeout=cfg.backend.connect_timeout,
                metadata=metadata,
                local_threads=cfg.local.threads,
                local_dtype=cfg.local.dtype,
            )

        return factory

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
        plan = preflight(ws, self.stages, name, overrides, backend)
        if isinstance(plan, StageFailed):
            yield plan
            return
        recorder = RunRecorder(ws, name, plan.config, plan.secrets)
        try:
            run_dir = recorder.open()
        except OSError as e:  # disk full, permissions: say so, and leave nothing marked running
            recorder.close()
            yield StageFailed(
                stage=name, message=f"cannot create the run folder under {ws.rel(ws.runs_dir)}: {e}"
            )
            return
        self.running, self._recorder = name, recorder
        try:
            async for ev in self._drive(plan, recorder, run_dir):
                yield ev
        finally:
            recorder.close()
            self.running, self._recorder = None, None

    async def _drive(
        self, plan: Plan, recorder: RunRecorder, run_dir: Path
    ) -> AsyncIterator[Event]:
        ws, name, spec, cfg = self.workspace, plan.name, plan.spec, plan.config
        from engine.backends import configure_hub

        configure_hub(cfg.backend.name)
        ctx = StageContext(
            workspace=ws,
            config=cfg,
            stage=name,
            run_dir=run_dir,
            secrets=plan.secrets,
            service_factory=self._factory_for(plan, run_dir),
            cancel_event=self._cancel,
        )
        listeners = list(self.listeners)
        wandb_listener = None
        if cfg.wandb.project.strip():
            from engine.pipeline.wandb_logger import WandbListener

            wandb_listener = WandbListener(cfg, name, run_dir, plan.secrets)
            listeners.append(wandb_listener)

        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        outcome: list[Event] = []

        async def notify(ev: Event, skip: Listener | None = None) -> None:
            for cb in listeners:
                if cb is skip:
                    continue
                try:
                    r = cb(ev)
                    if inspect.isawaitable(r):
                        await r
                except Exception as e:  # a broken listener must not kill the stage
                    warning = recorder.record(
                        LogLine(f"listener error ({_listener_name(cb)}): {e}", "warning")
                    )
                    await notify(warning, skip=cb)
                    await queue.put(warning)

        async def emit(ev: Event) -> None:
            ev = recorder.record(ev)
            if isinstance(ev, StageFinished | StageFailed):
                outcome.append(ev)
            await notify(ev)
            await queue.put(ev)
            if isinstance(ev, CheckpointSaved):
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(recorder.prune_checkpoints)

        async def drive() -> None:
            final: Event | None = None
            try:
                await emit(StageStarted(stage=name, run_dir=str(run_dir)))
                for warning in plan.warnings:
                    await emit(LogLine(warning, "warning"))
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
            status, detail = _service_outcome(outcome[-1] if outcome else None)
            await _close_service(ctx, status, detail)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(recorder.prune_checkpoints)
            if wandb_listener is not None:
                wandb_listener.close(0 if status == "success" else 1)


def _listener_name(cb: Any) -> str:
    return getattr(cb, "__qualname__", None) or type(cb).__name__


async def _close_service(
    ctx: StageContext, status: str = "success", detail: str | None = None
) -> None:
    """Free the run's service client (the local one holds models and a worker thread) and
    tell Tinker how the run ended: "success", "errored" or "interrupted"."""
    svc, ctx._service = ctx._service, None
    close = getattr(svc, "close", None)
    if close is None:
        return
    with contextlib.suppress(Exception):
        try:
            params = inspect.signature(close).parameters
        except (TypeError, ValueError):
            params = {}
        if "detail" in params:
            r = await asyncio.to_thread(close, status, detail)
        else:
            r = await asyncio.to_thread(close, status)
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
    """Every event of a run, in order. A line that cannot be read (half written by a crash, a
    log cut short by a full disk or a truncation) is replaced by a warning naming the line,
    so a replay says where its log is cut instead of silently missing the rest."""
    path = Path(run_dir) / "events.jsonl"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    terminated = lines[-1] == b""
    if terminated:
        lines.pop()
    out: list[Event] = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        event = _parse_event(raw)
        if event is None:
            cut = n == len(lines) and not terminated
            ts = getattr(out[-1], "ts", 0.0) if out else path.stat().st_mtime
            event = LogLine(_cut_note(path, n, cut), "warning", ts=ts)
        out.append(event)
    return out


def _cut_note(path: Path, line: int, cut: bool) -> str:
    where = f"{path.parent.name}/{path.name}: line {line}"
    if cut:
        return (
            f"{where} is cut off (the log ends mid-write: the process was killed, the disk "
            "filled or the file was truncated); what came after it is not recorded"
        )
    return f"{where} cannot be read; replayed without it"


def last_run_event(run_dir: str | Path, block: int = 65536) -> Event | None:
    """The last readable event of a run's log (``load_run_events`` without its notes about
    unreadable lines), read from the end of the file: status checks stay cheap however long
    a run's log grows."""
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
        if p.is_dir() and (p / "events.jsonl").exists() and (stage is None or _is_run_of(p, stage))
    ]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))


def _read_marker(run: Path) -> dict[str, Any] | None:
    """A run's running marker; None without a readable one."""
    try:
        data = json.loads((run / RUNNING_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _live_run(ws: Workspace, stage: str) -> Path | None:
    for run in list_runs(ws, stage):
        marker = _read_marker(run)
        if marker is None or marker.get("pid") == os.getpid():
            continue
        if _marker_is_live(marker):
            return run
    return None


# A later attempt in one of these states is a note beside the last result that completed.
UNFINISHED = ("failed", "cancelled", "interrupted")


@dataclass
class StageStatus:
    """One stage's state, the same for `persona status` and the app's Train tab.

    ``state`` is the stage's last result that completed: a failed, cancelled or interrupted
    rerun does not relabel finished work. Such a later attempt is ``attempt`` (its state),
    ``attempt_at`` (when it ended) and ``note`` (in words, with its message). Without an
    earlier completed run the attempt's state is the state itself (and ``note`` says so too).
    """

    name: str
    number: int
    title: str
    implemented: bool
    state: str  # "not run" | "running" | "done" | "failed" | "cancelled" | "interrupted" | "not implemented"
    outputs: list[str] = field(default_factory=list)  # existing output files, workspace-relative
    run_dir: str = ""  # the run the state comes from
    message: str = ""  # that run's failure message or finish summary
    checkpoint: dict[str, Any] = field(default_factory=dict)
    finished_at: float | None = None  # when that run ended
    disk_bytes: int = 0  # the stage's run folders (checkpoints included)
    note: str = ""  # a later attempt that did not complete, in words ("" when none)
    attempt: str = ""  # that attempt's state: "failed" | "cancelled" | "interrupted" | ""
    attempt_at: float | None = None  # when that attempt ended, when known


def run_state(run_dir: Path) -> tuple[str, str, float | None]:
    """(state, message, ts) of one run folder."""
    last = last_run_event(run_dir)
    if isinstance(last, StageFinished):
        return "done", last.summary, last.ts
    if isinstance(last, StageFailed):
        return ("cancelled" if last.cancelled else "failed"), last.message, last.ts
    marker = _read_marker(run_dir)
    if marker is not None and (marker.get("pid") == os.getpid() or _marker_is_live(marker)):
        return "running", "", None
    if not (run_dir / RUNNING_MARKER).exists() and last is not None:
        # the process ended on its own (it removed its marker) but its log lacks the end:
        # cut short (a full disk, a truncation), so say that rather than "killed"
        return (
            "interrupted",
            f"The end of its log {run_dir.name}/events.jsonl is missing (cut short: a full "
            "disk or a truncated file), so how the run ended is not recorded; run it again "
            "to be sure.",
            None,
        )
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
            _last_result(ws, st, runs)
            st.disk_bytes = sum(disk_usage(r) for r in runs)
        if name == "demos" and spec.run is not None and st.state != "running":
            # demos validates data/data.json: its state is the file's state now, not a
            # past run's (a fixed file is done, a broken one failed with today's problem)
            try:
                ws.load_demos()
            except (WorkspaceError, OSError) as e:
                st.state, st.message, st.outputs = "failed", str(e), []
            else:
                if st.state != "done":
                    st.state, st.message = "done", ""
            st.note, st.attempt, st.attempt_at = "", "", None  # the file's state, no attempt
        out.append(st)
    _note_later_prerequisites(out)
    return out


def _last_result(ws: Workspace, st: StageStatus, runs: list[Path]) -> None:
    """Fill ``st`` from the stage's runs (oldest first): the newest run's state, or, when
    that attempt did not complete, the last completed run's with the attempt as a note."""
    state, msg, ts = run_state(runs[-1])
    st.state, st.message, st.finished_at, st.run_dir = state, msg, ts, ws.rel(runs[-1])
    if state not in UNFINISHED:
        return
    st.attempt, st.attempt_at = state, ts
    when = f" at {time.strftime('%H:%M', time.localtime(ts))}" if ts else ""
    st.note = f"the last attempt{when} {state}: {msg}".rstrip(": ")
    for run in reversed(runs[:-1]):
        done, summary, done_ts = run_state(run)
        if done == "done":
            st.state, st.message, st.run_dir = "done", summary, ws.rel(run)
            st.finished_at = done_ts or run.stat().st_mtime
            return


def _note_later_prerequisites(rows: list[StageStatus]) -> None:
    """A stage whose only attempt failed, when an earlier stage completed after it: say that
    it may work now (its failure may have been that stage missing)."""
    done_at: dict[str, float] = {}
    for st in rows:
        if st.attempt and st.state != "done" and st.attempt_at is not None:
            since = [name for name, ts in done_at.items() if ts > st.attempt_at]
            if since:
                st.note += f" ({', '.join(since)} ran since: try again)"
        if st.state == "done" and st.finished_at:
            done_at[st.name] = st.finished_at


def workspace_disk_use(workspace: Workspace) -> dict[str, int]:
    """Bytes in runs/ and results/."""
    return {"runs": disk_usage(workspace.runs_dir), "results": disk_usage(workspace.results_dir)}
