"""``persona speed``: how fast the local service runs on this machine, and what that makes
each stage cost.

The profile (engine/backends/local/speed_profile.py) is measured once per machine, model,
dtype and thread count (a few seconds) and cached under ``~/.cache/persona/speed/``
(``PERSONA_CACHE_DIR`` moves it); ``--remeasure`` measures again. In a workspace, each
stage's estimate at its settings (``--set`` as for ``persona run``) follows.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.store.config import ConfigError, load_config
from engine.store.workspace import Workspace


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "speed",
        help="measure this machine's speed for the local service (once, cached) and "
        "estimate each stage",
    )
    p.add_argument("--remeasure", action="store_true", help="measure again, even if cached")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show what each estimate assumes")
    return p


def run(args: argparse.Namespace, ws: Workspace) -> int:
    from engine.backends import configure_hub
    from engine.backends.local.speed_profile import speed_dir
    from engine.pipeline.estimate import (
        EstimateError,
        cached_profiles,
        estimate_stage,
        measure_profiles,
    )

    console = Console()
    err = Console(stderr=True)
    in_workspace = ws.config_path.exists()
    try:
        cfg = ws.config(args.overrides) if in_workspace else load_config(None, args.overrides)
    except ConfigError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        return 2
    if cfg.backend.name != "local":
        console.print(
            "This workspace runs on Tinker: stage times depend on the service. "
            "`persona speed` measures the local service (--set backend.name=local)."
        )
        return 0
    configure_hub("local")
    if args.remeasure:
        models = None
        profiles: dict[str, Any] = {}
    else:
        profiles, models = cached_profiles(cfg)
    if models is None or models:
        console.print("measuring this machine's speed (a few seconds, then cached)…")
        profiles.update(measure_profiles(cfg, models, remeasure=args.remeasure))
    for p in profiles.values():
        console.print(escape(p.summary()))
        measured = f"measured {p.measured_at} in {p.measure_s:.1f} s" if p.measured_at else ""
        console.print(
            f"  [dim]{escape(measured)} · CPU {escape(p.key.cpu)} "
            f"({escape(' '.join(p.key.cpu_flags) or 'no flags read')}) · torch "
            f"{escape(p.key.torch)}[/dim]"
        )
    console.print(f"[dim]cached in {escape(str(speed_dir()))}[/dim]")
    if not in_workspace:
        return 0
    from engine.stages import STAGES

    table = Table(title="each stage at these settings", expand=False)
    for col in ("stage", "time", "mostly"):
        table.add_column(col)
    notes: list[str] = []
    for name in STAGES:
        try:
            est = estimate_stage(name, cfg, ws, profiles)
        except EstimateError as e:
            table.add_row(name, "–", escape(str(e)))
            continue
        except Exception as e:  # one stage's inputs unreadable: say so, go on
            table.add_row(name, "?", escape(f"{type(e).__name__}: {e}"))
            continue
        if est is None:
            continue
        if not est.parts:
            table.add_row(name, "–", escape(est.line()))
            continue
        table.add_row(name, est.total(), escape(est.top_parts(3)))
        if args.verbose:
            notes += [f"{name}: {a}" for a in est.assumptions]
    console.print(table)
    if notes:
        for n in notes:
            console.print(f"  [dim]{escape(n)}[/dim]")
    console.print(
        "[dim]≤: every answer is taken to run to max_tokens (most stop sooner); "
        "-v shows what each estimate assumes[/dim]"
    )
    return 0
