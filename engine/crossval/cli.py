"""``persona crossval``: the cost estimate, then every fold stage with fold i/k progress, then
the pooled report. Ctrl+C stops after the running stage's step; rerun to continue.

    persona crossval [--folds K] [--methods a,b,...] [--seed S] [--new] [--set k=v ...]
    persona crossval --estimate     the plan and its cost; nothing runs, nothing is written
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import PersonaError
from engine.run.events import Event, StageFailed, StageFinished, StageStarted
from engine.run.events import Progress as ProgressEvent
from engine.store.config import ConfigError
from engine.store.workspace import Workspace


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "crossval",
        help="compare methods with every demonstration held out once (k folds)",
    )
    p.add_argument("--folds", type=int, help="number of folds (crossval.folds)")
    p.add_argument("--methods", help="comma-separated methods (crossval.methods)")
    p.add_argument("--seed", type=int, help="seed of the folds (crossval.seed)")
    p.add_argument("--new", action="store_true", help="start another instead of continuing")
    p.add_argument("--no-estimate", action="store_true", help="skip the cost estimate")
    p.add_argument(
        "--estimate", action="store_true", help="show the plan and its cost, run nothing"
    )
    p.add_argument("--backend", choices=("local", "tinker"))
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.folds is not None:
        out.append(f"crossval.folds={args.folds}")
    if args.seed is not None:
        out.append(f"crossval.seed={args.seed}")
    if args.methods:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        out.append("crossval.methods=[" + ", ".join(f'"{m}"' for m in names) + "]")
    return out


def _show_estimate(ws: Workspace, plan: Any, left: int, total: int, console: Console) -> None:
    from engine.crossval.estimate import estimate_crossval
    from engine.pipeline.estimate import cached_profiles, human_seconds, measure_profiles

    cfg = ws.config(plan.overrides, plan.backend)
    if cfg.backend.name != "local":
        console.print("cost: on Tinker the time depends on the service (k × each stage's run)")
        return
    profiles, to_measure = cached_profiles(cfg)
    if to_measure and not profiles:
        console.print("measuring this machine's speed (a few seconds, then cached)…")
        profiles = measure_profiles(cfg, to_measure)
    cost = estimate_crossval(plan, ws, profiles)
    if cost is None:
        return
    table = Table(title="cost estimate", expand=False)
    for col in ("stage", "one run", "runs", "total"):
        table.add_column(col)
    for s in cost.stages:
        one = human_seconds(s.seconds) if s.seconds is not None else f"– ({s.why})"
        total_s = human_seconds(s.total) if s.total is not None else "–"
        table.add_row(s.stage, escape(one), str(s.times), total_s)
    console.print(table)
    console.print(escape(cost.line()))
    if cost.seconds is not None and left < total:
        console.print(f"about {human_seconds(cost.seconds * left / total)} left")
    for note in cost.notes:
        console.print(f"[dim]{escape(note)}[/dim]")


async def _drive(cv: Any, console: Console, verbose: bool) -> Event | None:
    from engine.cli import CliView, _plain, install_stop_signals
    from engine.crossval.run import FoldEvent

    install_stop_signals(cv, console)
    final: Event | None = None
    with CliView(console, verbose) as view:
        async for item in cv.run():
            if not isinstance(item, FoldEvent):
                final = item
                continue
            ev = item.event
            if isinstance(ev, StageStarted):
                console.print(
                    f"[bold]{_plain(item.where)}[/bold] "
                    f"[dim](fold stage {item.index} of {item.total})[/dim]"
                )
            if isinstance(ev, ProgressEvent):
                ev = dataclasses.replace(ev, label=f"{item.where} · {ev.label or 'running'}")
            elif isinstance(ev, StageStarted):
                ev = dataclasses.replace(ev, stage=item.where)
            view(ev)
    return final


def run(args: argparse.Namespace, ws: Workspace) -> int:
    from engine.backends import configure_hub
    from engine.cli import _plain
    from engine.crossval import Crossval, choose_plan, pending
    from engine.crossval.run import fold_stages

    console, err = Console(), Console(stderr=True)
    overrides = _overrides(args)
    try:
        cfg = ws.config(overrides, args.backend)
        plan, continuing = choose_plan(ws, cfg, overrides, args.backend, new=args.new)
    except ConfigError as e:
        err.print(f"[red]{_plain(str(e))}[/red]")
        return 2
    except PersonaError as e:
        err.print(f"[red]{_plain(str(e))}[/red]")
        return 2
    configure_hub(cfg.backend.name)
    total = len(fold_stages(plan))
    left = len(pending(plan)) if continuing else total
    console.print(
        ("continuing " if continuing else "plan for " if args.estimate else "starting ")
        + f"{_plain(ws.rel(plan.root))}: {_plain(plan.describe())}"
        + (f" ({left} of {total} fold stages left)" if continuing else "")
    )
    if not args.no_estimate:
        try:
            _show_estimate(ws, plan, left, total, console)
        except Exception as e:  # an estimate must never stop the run
            console.print(f"[yellow]no estimate: {_plain(str(e))}[/yellow]")
    if args.estimate:
        return 0
    final = asyncio.run(_drive(Crossval(ws, plan), console, args.verbose))
    if isinstance(final, StageFinished):
        console.print(f"[bold green]✓ crossval[/bold green] {_plain(final.summary)}")
        for o in final.outputs:
            console.print(f"  {_plain(o)}")
        return 0
    msg = final.message if isinstance(final, StageFailed) else "crossval ended without a result"
    if isinstance(final, StageFailed) and final.cancelled:
        err.print(f"[yellow]{_plain(msg)}[/yellow]")
        return 130
    err.print(f"[bold red]✗ crossval failed[/bold red]\n{_plain(msg)}")
    return 1
