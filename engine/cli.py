"""The engine's command line (``python -m engine.cli``; the ``persona`` script is
``persona_cli``, which adds the app when no command is given: the engine never imports it).

    persona init [DIR]            create a workspace with the example data
    persona run STAGE [--backend local|tinker] [--set section.key=value ...]
    persona status [--json]       each stage's state, outputs and checkpoint
    persona serve [--host H] [--port N] [--key-file F]   the local service with Tinker's API
    persona crossval [--folds K]  every demonstration held out once (engine.crossval)

Exit codes: 0 done, 1 failed (the message says what to do), 2 bad usage, 130 cancelled.

Ctrl+C, SIGTERM and SIGHUP stop the stage after its current step (a cancel checkpoint, a
final event, the running marker removed); a second Ctrl+C or SIGTERM quits at once with 130,
after the run's log is closed with a final event. A closed terminal (SIGHUP, however many a
closing window or tmux delivers) is one cancel, and output to it is dropped, never raised.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.pipeline.runner import Runner, stage_status, workspace_disk_use
from engine.run.events import (
    CheckpointSaved,
    Event,
    LogLine,
    Metric,
    SampleProduced,
    StageFailed,
    StageFinished,
    StageStarted,
)
from engine.run.events import (
    Progress as ProgressEvent,
)
from engine.store.checkpoints import check_registry
from engine.store.config import ConfigError
from engine.store.workspace import Workspace, find_workspace, init_workspace

KEY_METRICS = ("train/loss", "val/loss", "synth_inputs/yield", "rl/reward", "dev/win_rate")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """User text made safe for a terminal: control bytes (ESC, NUL, ...) shown escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _short(text: str, n: int = 70) -> str:
    text = printable(" ".join(text.split()))
    return text if len(text) <= n else text[: n - 1] + "…"


def _checkpoint_text(ck: dict[str, Any]) -> str:
    """A registry entry in a few words; an unfinished retrain names the finished run whose
    outputs the stage's results still are."""
    if not ck:
        return ""
    text = f"step {ck.get('step')}" + ("" if ck.get("finished") else " (unfinished)")
    last = ck.get("last_finished")
    if not ck.get("finished") and isinstance(last, dict):
        text += f"; results are from the finished run at step {last.get('step')}"
    return text


def _plain(text: str) -> str:
    """Text for rich: control bytes escaped, markup shown literally."""
    return escape(printable(text))


class TerminalStream:
    """stdout or stderr for rich, whose writes never raise: once the terminal is gone (EIO or
    EPIPE: a closed window, ``tmux kill-session``) output is dropped, and the process's own
    file descriptors on that terminal are pointed at /dev/null, so nothing else that writes
    there (a library's warning, the interpreter's last flush) fails either."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lost()

    def isatty(self) -> bool:
        try:
            return not self.gone and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)

    def _lost(self) -> None:
        self.gone = True
        with contextlib.suppress(Exception):
            _detach_dead_terminal(self._stream.fileno())


def _detach_dead_terminal(dead_fd: int) -> None:
    """Point fd 1 and 2 at /dev/null where they are the same (dead) terminal as ``dead_fd``."""
    dead = os.fstat(dead_fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in {dead_fd, 1, 2}:
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino, st.st_rdev) == (dead.st_dev, dead.st_ino, dead.st_rdev):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def terminal_console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that drops its output once the terminal is gone."""
    return Console(file=TerminalStream(sys.stderr if stderr else sys.stdout))


class CliView:
    """Renders events: a progress bar, a live key-metric line, log lines above them."""

    def __init__(self, console: Console, verbose: bool = False) -> None:
        self.console = console
        self.verbose = verbose
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            transient=False,
        )
        self.task = None
        self.metrics: dict[str, float] = {}

    def __enter__(self) -> CliView:
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=None, metrics="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def _metric_line(self) -> str:
        keys = [k for k in KEY_METRICS if k in self.metrics] or list(self.metrics)[:2]
        return "  ".join(f"{k} {self.metrics[k]:.4g}" for k in keys)

    def __call__(self, ev: Event) -> None:
        p, c = self.progress, self.progress.console
        if isinstance(ev, StageStarted):
            p.update(self.task, description=ev.stage)
            c.print(f"[dim]run folder {_plain(ev.run_dir)}[/dim]")
        elif isinstance(ev, ProgressEvent):
            p.update(
                self.task,
                completed=ev.done,
                total=ev.total or None,
                description=_plain(ev.label or "running"),
            )
        elif isinstance(ev, Metric):
            self.metrics[ev.name] = ev.value
            p.update(self.task, metrics=escape(self._metric_line()))
        elif isinstance(ev, LogLine):
            style = {"warning": "yellow", "error": "red"}.get(ev.level, "")
            lines = ev.message.splitlines() or [""]
            msg = _plain(ev.message if (self.verbose or ev.level != "error") else lines[-1])
            c.print(f"[{style}]{msg}[/{style}]" if style else msg)
        elif isinstance(ev, SampleProduced):
            c.print(
                f"[cyan]{_plain(ev.source)}[/cyan] {escape(_short(ev.input, 50))} "
                f"[dim]→[/dim] {escape(_short(ev.output))}"
            )
        elif isinstance(ev, CheckpointSaved):
            c.print(f"[green]checkpoint[/green] {_plain(ev.name)} at step {ev.step}")


async def _run(
    ws: Workspace,
    stage: str,
    overrides: list[str],
    backend: str | None,
    console: Console,
    verbose: bool,
) -> int:
    runner = Runner(ws)
    install_stop_signals(runner, console)
    final: Event | None = None
    with CliView(console, verbose) as view:
        async for ev in runner.run_stage(stage, overrides, backend):
            view(ev)
            final = ev
    if isinstance(final, StageFinished):
        console.print(f"[bold green]✓ {escape(stage)}[/bold green] {_plain(final.summary)}")
        for o in final.outputs:
            console.print(f"  {_plain(o)}")
        return 0
    msg = final.message if isinstance(final, StageFailed) else "the stage ended without a result"
    err = terminal_console(stderr=True)
    if isinstance(final, StageFailed) and final.cancelled:
        err.print(f"[yellow]{_plain(msg)}[/yellow]")
        return 130
    err.print(f"[bold red]✗ {escape(stage)} failed[/bold red]\n{_plain(msg)}")
    return 1


STOP_SIGNALS = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None
)


def install_stop_signals(
    runner: Runner, console: Console, exit_now: Callable[[int], Any] = os._exit
) -> Callable[[int], None]:
    """Ctrl+C, SIGTERM and SIGHUP: the first stops the stage after its step (as the app's
    cancel does); a second Ctrl+C or SIGTERM quits at once with 130. SIGHUP (the terminal
    closed: it often comes twice, from the kernel and from the shell or tmux) never counts as
    a second interrupt: a closed terminal is one cancel. Quitting uses ``os._exit`` after the
    run's log and marker are settled: a normal interpreter exit would wait on (and can abort
    in) the backend's compute thread. Returns the handler (tests call it directly)."""
    count = 0
    hup = getattr(signal, "SIGHUP", None)

    def on_signal(signum: int) -> None:
        nonlocal count
        if hup is not None and signum == int(hup) and count:
            return  # already stopping: a hang-up is not a request to quit now
        count += 1
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else ""
        if count == 1:
            console.print(
                f"[yellow]{name + ': ' if name and name != 'SIGINT' else ''}stopping after the "
                "current step (Ctrl+C again to quit now)[/yellow]"
            )
            runner.cancel()
            return
        runner.abandon(
            "quit before the stage stopped (a second interrupt). Results files hold their "
            "last complete content; run it again to resume or start over."
        )
        with contextlib.suppress(Exception):
            console.print("[yellow]quit now[/yellow]")
            console.file.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        exit_now(130)

    with contextlib.suppress(RuntimeError):
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal, int(sig))
    return on_signal


def _workspace_missing(ws: Workspace, given: str | None) -> str:
    """Why ``ws`` is not a workspace ("" when it is)."""
    if given and not ws.root.is_dir():
        return (
            f"No folder {ws.root}: check -C/--workspace, or create a workspace there with "
            f"`persona init {ws.root}`."
        )
    if not ws.config_path.exists():
        return f"No persona.toml in {ws.root}: run `persona init` there first, or pass -C DIR."
    return ""


def cmd_status(ws: Workspace, as_json: bool, console: Console) -> int:
    from engine.backends import describe_compute
    from engine.store.checkpoint_retention import human_bytes

    rows = stage_status(ws)
    try:
        compute = describe_compute(ws.config())
    except ConfigError as e:
        compute = {"backend": "?", "device": "?", "dtype": "?", "error": str(e)}
    disk = workspace_disk_use(ws)
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2, default=str))
        return 0
    console.print(
        f"backend [bold]{_plain(compute['backend'])}[/bold]  device {_plain(compute['device'])}"
        f"  dtype {_plain(compute['dtype'])}  ·  disk: runs {human_bytes(disk['runs'])}, "
        f"results {human_bytes(disk['results'])}"
    )
    table = Table(title=f"Persona workspace {_plain(str(ws.root))}", expand=False)
    for col in ("#", "stage", "state", "outputs", "checkpoint", "disk"):
        table.add_column(col)
    colors = {
        "done": "green",
        "failed": "red",
        "running": "cyan",
        "cancelled": "yellow",
        "interrupted": "yellow",
    }
    for r in rows:
        ck = r.checkpoint
        ck_text = _checkpoint_text(ck)
        color = colors.get(r.state, "dim")
        # done, with a later attempt that did not complete (named below the table)
        mark = " [bold yellow]![/bold yellow]" if r.note and r.state == "done" else ""
        table.add_row(
            str(r.number),
            r.name,
            f"[{color}]{r.state}[/{color}]{mark}",
            _plain("\n".join(r.outputs)),
            _plain(ck_text),
            human_bytes(r.disk_bytes) if r.disk_bytes else "",
        )
    console.print(table)
    registry_problem = check_registry(ws.results_dir)
    if registry_problem:
        console.print(f"[yellow]{_plain(registry_problem)}[/yellow]")
    for r in rows:
        if r.note:  # a later attempt that failed, was cancelled or interrupted
            color = "yellow" if r.state == "done" else "red"
            console.print(f"[{color}]{r.name}[/{color}]: {_plain(r.note)}")
        elif r.state in ("failed", "interrupted") and r.message:
            console.print(f"[red]{r.name}[/red]: {_plain(r.message)}")
    return 0


def stage_name(text: str) -> str:
    """A stage's name for ``persona run``; a typo gets the nearest name."""
    from engine.stages import STAGES

    if text in STAGES:
        return text
    near = difflib.get_close_matches(text, list(STAGES), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise argparse.ArgumentTypeError(f"unknown stage {text!r}{hint} (stages: {', '.join(STAGES)})")


def build_parser(extra: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The parser; ``extra``: more commands by name, each with ``add_parser(subparsers)`` and
    ``run(args, workspace) -> int`` (the ``persona`` script adds its own this way)."""
    from engine.stages import STAGES

    p = argparse.ArgumentParser(
        prog="persona",
        description="Personalize a language model to your writing. "
        "With no command, `persona` opens the app on the workspace.",
    )
    p.add_argument(
        "-C", "--workspace", help="workspace folder (default: the nearest one holding persona.toml)"
    )
    sub = p.add_subparsers(dest="command", title="commands (none: open the app)")
    pi = sub.add_parser("init", help="create a workspace with the example data")
    pi.add_argument("dir", nargs="?", default=".", help="the folder to create (default: here)")
    pi.add_argument("--force", action="store_true", help="overwrite existing config and data files")
    pr = sub.add_parser("run", help="run one stage")
    pr.add_argument("stage", type=stage_name, metavar="STAGE", help=" | ".join(STAGES))
    pr.add_argument(
        "--backend",
        choices=("local", "tinker"),
        help="where models run: local (this machine) or tinker (needs TINKER_API_KEY in .env); "
        "default: persona.toml's [backend] name",
    )
    pr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change one persona.toml setting for this run (repeatable), e.g. sft.lr=1e-4",
    )
    pr.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    ps = sub.add_parser("status", help="show each stage's state, outputs and checkpoint")
    ps.add_argument("--json", action="store_true", help="print the states as JSON")
    from engine.serve import command as serve_command

    serve_command.add_parser(sub)
    for command in (extra or {}).values():
        command.add_parser(sub)
    return p


def persona_command() -> str:
    """A command that starts this program from any folder: ``persona`` when the shell finds
    this one, else the script next to this Python (``.venv/bin/persona``), else ``python -m``."""
    script = Path(sys.executable).parent / "persona"
    found = shutil.which("persona")
    if found and script.exists() and Path(found).resolve() == script.resolve():
        return "persona"
    if script.exists():
        return shlex.quote(str(script))
    if found:
        return "persona"
    return f"{shlex.quote(sys.executable)} -m persona_cli"


def _error(message: str) -> None:
    terminal_console(stderr=True).print(f"[red]{_plain(message)}[/red]")


def main(
    argv: list[str] | None = None,
    no_command: Callable[[Workspace], int] | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """Run one command; with none, ``no_command(workspace)`` (the app) or the help.
    ``extra``: more commands (see build_parser)."""
    from engine.backends import configure_hub, quiet_libraries

    quiet_libraries()  # no "Loading weights" bars from transformers on the terminal
    from engine.crossval import cli as crossval_cli

    extra = {"crossval": crossval_cli, **(extra or {})}
    parser = build_parser(extra)
    args = parser.parse_args(argv)
    console = terminal_console()
    ws = Workspace(Path(args.workspace)) if args.workspace else find_workspace()
    if args.command == "init":
        root = Path(args.dir) if not args.workspace else Path(args.workspace)
        ws = init_workspace(root, force=args.force)
        console.print(
            f"workspace ready at {_plain(str(ws.root))}\n  edit data/data.json and "
            f"data/prompts.toml, then: cd {_plain(shlex.quote(str(root)))} && "
            f"{_plain(persona_command())} run baseline"
        )
        return 0
    if args.command in ("run", "status", "crossval"):
        missing = _workspace_missing(ws, args.workspace)
        if missing:
            _error(missing)
            return 2
    if args.command == "run":
        try:  # every key checked before anything runs
            cfg = ws.config(args.overrides, args.backend)
        except ConfigError as e:
            _error(str(e))
            return 2
        # The hub is read once, at import: set it for this backend before anything loads it.
        configure_hub(cfg.backend.name)
        return asyncio.run(
            _run(ws, args.stage, args.overrides, args.backend, console, args.verbose)
        )
    if args.command == "status":
        return cmd_status(ws, args.json, console)
    if args.command == "serve":
        from engine.serve import command as serve_command

        return serve_command.run(args, ws)
    if extra and args.command in extra:
        return int(extra[args.command].run(args, ws) or 0)
    if no_command is not None:
        return int(no_command(ws) or 0)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
