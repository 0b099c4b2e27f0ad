"""The ``persona`` command line.

    persona                       open the TUI in the current workspace
    persona init [DIR]            create a workspace with the example data
    persona run STAGE [--backend local|tinker] [--set section.key=value ...]
    persona status [--json]       each stage's state, outputs and checkpoint

Exit codes: 0 done, 1 failed (the message says what to do), 2 bad usage, 130 cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.config import ConfigError
from engine.events import (
    CheckpointSaved,
    Event,
    LogLine,
    Metric,
    SampleProduced,
    StageFailed,
    StageFinished,
    StageStarted,
)
from engine.events import (
    Progress as ProgressEvent,
)
from engine.runner import Runner, stage_status
from engine.workspace import Workspace, find_workspace, init_workspace

KEY_METRICS = ("train/loss", "val/loss", "synth_inputs/yield", "rl/reward", "dev/win_rate")


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


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
            c.print(f"[dim]run folder {escape(ev.run_dir)}[/dim]")
        elif isinstance(ev, ProgressEvent):
            p.update(
                self.task,
                completed=ev.done,
                total=ev.total or None,
                description=escape(ev.label or "running"),
            )
        elif isinstance(ev, Metric):
            self.metrics[ev.name] = ev.value
            p.update(self.task, metrics=escape(self._metric_line()))
        elif isinstance(ev, LogLine):
            style = {"warning": "yellow", "error": "red"}.get(ev.level, "")
            msg = escape(
                ev.message if (self.verbose or ev.level != "error") else ev.message.splitlines()[-1]
            )
            c.print(f"[{style}]{msg}[/{style}]" if style else msg)
        elif isinstance(ev, SampleProduced):
            c.print(
                f"[cyan]{escape(ev.source)}[/cyan] {escape(_short(ev.input, 50))} [dim]→[/dim] {escape(_short(ev.output))}"
            )
        elif isinstance(ev, CheckpointSaved):
            c.print(f"[green]checkpoint[/green] {escape(ev.name)} at step {ev.step}")


async def _run(
    ws: Workspace,
    stage: str,
    overrides: list[str],
    backend: str | None,
    console: Console,
    verbose: bool,
) -> int:
    runner = Runner(ws)
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            console.print(
                "[yellow]stopping after the current step (Ctrl+C again to quit now)[/yellow]"
            )
            runner.cancel()
        else:
            raise SystemExit(130)

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    final: Event | None = None
    with CliView(console, verbose) as view:
        async for ev in runner.run_stage(stage, overrides, backend):
            view(ev)
            final = ev
    if isinstance(final, StageFinished):
        console.print(f"[bold green]✓ {escape(stage)}[/bold green] {escape(final.summary)}")
        for o in final.outputs:
            console.print(f"  {escape(o)}")
        return 0
    msg = final.message if isinstance(final, StageFailed) else "the stage ended without a result"
    err = Console(stderr=True)
    if isinstance(final, StageFailed) and final.cancelled:
        err.print(f"[yellow]{escape(msg)}[/yellow]")
        return 130
    err.print(f"[bold red]✗ {escape(stage)} failed[/bold red]\n{escape(msg)}")
    return 1


def cmd_status(ws: Workspace, as_json: bool, console: Console) -> int:
    rows = stage_status(ws)
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2, default=str))
        return 0
    table = Table(title=f"Persona workspace {ws.root}", expand=False)
    for col in ("#", "stage", "state", "outputs", "checkpoint"):
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
        ck_text = (
            f"step {ck.get('step')}{'' if ck.get('finished') else ' (unfinished)'}" if ck else ""
        )
        color = colors.get(r.state, "dim")
        table.add_row(
            str(r.number),
            r.name,
            f"[{color}]{r.state}[/{color}]",
            escape("\n".join(r.outputs)),
            escape(ck_text),
        )
    console.print(table)
    for r in rows:
        if r.state in ("failed", "interrupted") and r.message:
            console.print(f"[red]{r.name}[/red]: {escape(r.message)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from engine.stages import STAGES

    p = argparse.ArgumentParser(
        prog="persona", description="Personalize a language model to your writing."
    )
    p.add_argument(
        "-C", "--workspace", help="workspace folder (default: the nearest one holding persona.toml)"
    )
    sub = p.add_subparsers(dest="command")
    pi = sub.add_parser("init", help="create a workspace with the example data")
    pi.add_argument("dir", nargs="?", default=".")
    pi.add_argument("--force", action="store_true", help="overwrite existing config and data files")
    pr = sub.add_parser("run", help="run one stage")
    pr.add_argument("stage", choices=list(STAGES), metavar="STAGE", help=" | ".join(STAGES))
    pr.add_argument("--backend", choices=("local", "tinker"))
    pr.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    pr.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    ps = sub.add_parser("status", help="show each stage's state, outputs and checkpoint")
    ps.add_argument("--json", action="store_true")
    return p


def _hub_offline_for_local(backend: str) -> None:
    """The local backend reads everything from disk: switch the HF hub off before anything
    imports huggingface_hub (it reads the setting once). Tinker's SDK fetches its tokenizers."""
    if backend == "local":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    ws = Workspace(Path(args.workspace)) if args.workspace else find_workspace()
    if args.command == "init":
        root = Path(args.dir) if not args.workspace else Path(args.workspace)
        ws = init_workspace(root, force=args.force)
        console.print(
            f"workspace ready at {escape(str(ws.root))}\n  edit data/data.json and data/prompts.toml, "
            f"then: cd {escape(str(root))} && persona run baseline"
        )
        return 0
    if args.command == "run":
        if not ws.config_path.exists():
            Console(stderr=True).print(
                f"[red]No persona.toml in {escape(str(ws.root))}[/red]: run `persona init` first."
            )
            return 2
        try:  # every key checked before anything runs
            cfg = ws.config(args.overrides, args.backend)
        except ConfigError as e:
            Console(stderr=True).print(f"[red]{escape(str(e))}[/red]")
            return 2
        _hub_offline_for_local(cfg.backend.name)
        return asyncio.run(
            _run(ws, args.stage, args.overrides, args.backend, console, args.verbose)
        )
    if args.command == "status":
        return cmd_status(ws, args.json, console)
    # no command: the TUI
    try:
        from tui.app import main as tui_main  # type: ignore[import-not-found]
    except ImportError:
        parser.print_help()
        return 0
    return int(tui_main(str(ws.root)) or 0)


if __name__ == "__main__":
    sys.exit(main())
