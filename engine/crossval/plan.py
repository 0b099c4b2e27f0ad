"""A cross-validation's plan: ``runs/crossval-<time>/crossval.json``.

It records what the folds were dealt from and with (seed, fold count, each fold's held-out
requests, the data's hash), the methods, the stages each fold runs, the ``--set`` overrides and
the backend, and whether it finished. ``persona crossval`` continues the latest plan when it is
asked for the same thing (a finished one is only pooled again), and refuses to leave an
unfinished one asked for differently (``--new`` starts another).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.crossval.folds import (
    SHARED_STAGES,
    CrossvalError,
    data_sha,
    deal_folds,
    fold_count,
    method_names,
    stages_for,
)
from engine.store.atomic import atomic_write_json
from engine.store.settings import PersonaConfig
from engine.store.workspace import Workspace

PLAN_FILE = "crossval.json"
PREFIX = "crossval-"


@dataclass
class CrossvalPlan:
    root: Path
    seed: int
    methods: list[str]
    stages: list[str]  # per fold, evaluate last
    shared: list[str]  # run once, their outputs copied into every fold
    folds: list[list[int]]  # held-out positions in data/data.json
    holdouts: list[list[str]]  # the same as requests
    overrides: list[str] = field(default_factory=list)
    backend: str | None = None
    data_sha: str = ""
    created: str = ""
    finished: bool = False

    @property
    def k(self) -> int:
        return len(self.folds)

    def fold_dir(self, i: int) -> Path:
        """Fold ``i`` (1-based)'s workspace; 0 is the shared one."""
        return self.root / ("shared" if i == 0 else f"fold-{i}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return {"version": 1, **d}

    def save(self) -> Path:
        return atomic_write_json(self.root / PLAN_FILE, self.to_json())

    def same_request(self, other: CrossvalPlan) -> bool:
        keys = ("seed", "methods", "folds", "holdouts", "overrides", "backend", "data_sha")
        return all(getattr(self, key) == getattr(other, key) for key in keys)

    def describe(self) -> str:
        return (
            f"{self.k} folds (seed {self.seed}), methods {', '.join(self.methods)}, "
            f"stages per fold {', '.join(self.stages)}"
            + (f", --set {' '.join(self.overrides)}" if self.overrides else "")
        )


def load_plan(root: Path) -> CrossvalPlan:
    path = root / PLAN_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw.pop("version", None)
        return CrossvalPlan(root=root, **raw)
    except (OSError, ValueError, TypeError) as e:
        raise CrossvalError(f"{path}: not a readable cross-validation plan ({e})") from e


def list_plans(ws: Workspace) -> list[Path]:
    """Cross-validation folders, oldest first."""
    if not ws.runs_dir.exists():
        return []
    return sorted(
        p for p in ws.runs_dir.iterdir() if p.name.startswith(PREFIX) and (p / PLAN_FILE).exists()
    )


def new_plan(
    ws: Workspace, cfg: PersonaConfig, overrides: list[str], backend: str | None
) -> CrossvalPlan:
    """The plan for this workspace and config (not yet written anywhere)."""
    demos = ws.load_demos()
    cv = cfg.crossval
    k = fold_count(cv.folds, len(demos))
    folds = deal_folds(demos, k, cv.seed)
    methods = method_names(cv.methods)
    stages = stages_for(methods)
    return CrossvalPlan(
        root=ws.runs_dir / f"{PREFIX}{time.strftime('%Y%m%d-%H%M%S')}",
        seed=cv.seed,
        methods=methods,
        stages=[s for s in stages if s not in SHARED_STAGES],
        shared=[s for s in stages if s in SHARED_STAGES],
        folds=folds,
        holdouts=[[demos[i]["input"] for i in f] for f in folds],
        overrides=list(overrides),
        backend=backend,
        data_sha=data_sha(ws),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def choose_plan(
    ws: Workspace,
    cfg: PersonaConfig,
    overrides: list[str],
    backend: str | None,
    *,
    new: bool = False,
) -> tuple[CrossvalPlan, bool]:
    """(the plan to run, whether it continues the latest one). The latest plan is continued
    when it asks for the same thing (a finished one only pools again); an unfinished one asked
    differently is refused (``new`` starts another)."""
    wanted = new_plan(ws, cfg, overrides, backend)
    plans = list_plans(ws)
    if new or not plans:
        return wanted, False
    latest = load_plan(plans[-1])
    if latest.same_request(wanted):  # a finished one is pooled again: nothing reruns
        return latest, True
    if latest.finished:
        return wanted, False
    raise CrossvalError(
        f"{ws.rel(latest.root)} is unfinished and was asked for {latest.describe()}; "
        f"this asks for {wanted.describe()}"
        + (" (data/data.json changed since)" if latest.data_sha != wanted.data_sha else "")
        + ". Rerun as it was to continue it, or pass --new to start another."
    )
