"""What a cross-validation costs before it is launched: k × each fold stage's estimate
(engine.estimate, priced on the person's workspace at the fold's settings), plus the shared
stages once."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.crossval.plan import CrossvalPlan
from engine.estimate import EstimateError, estimate_stage, human_seconds
from engine.workspace import Workspace


@dataclass(frozen=True)
class StageCost:
    stage: str
    times: int  # how many times it runs: k, or 1 for a shared stage
    seconds: float | None  # one run; None: no estimate (``why`` says why)
    why: str = ""
    upper_bound: bool = False

    @property
    def total(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.times


@dataclass(frozen=True)
class CrossvalCost:
    stages: tuple[StageCost, ...]
    notes: tuple[str, ...] = ()

    @property
    def seconds(self) -> float | None:
        """The whole cross-validation; None when a stage has no estimate."""
        totals = [s.total for s in self.stages]
        return None if any(t is None for t in totals) else sum(t or 0.0 for t in totals)

    def line(self) -> str:
        """One line: "≤ 42 min for 5 folds (ditto 6.1 min, evaluate 2.3 min per fold)"."""
        if self.seconds is None:
            missing = [s.stage for s in self.stages if s.seconds is None]
            return f"no estimate for {', '.join(missing)}"
        bound = "≤" if any(s.upper_bound for s in self.stages) else "≈"
        per = ", ".join(
            f"{s.stage} {human_seconds(s.seconds or 0)}" + (" once" if s.times == 1 else "")
            for s in self.stages
        )
        return f"{bound} {human_seconds(self.seconds)} on this machine ({per} per fold)"


def estimate_crossval(
    plan: CrossvalPlan, workspace: Workspace, profiles: Mapping[str, Any]
) -> CrossvalCost | None:
    """None on the Tinker backend (no estimate there)."""
    overrides = [*plan.overrides, f"evaluate.methods={json.dumps(plan.methods)}"]
    cfg = workspace.config(overrides, plan.backend)
    if cfg.backend.name != "local":
        return None
    costs = []
    for stage, times in [(s, 1) for s in plan.shared] + [(s, plan.k) for s in plan.stages]:
        try:
            est = estimate_stage(stage, cfg, workspace, profiles)
        except EstimateError as e:
            costs.append(StageCost(stage, times, None, str(e)))
            continue
        if est is None:
            return None
        costs.append(StageCost(stage, times, est.seconds, upper_bound=est.upper_bound))
    sizes = sorted({len(f) for f in plan.folds})
    notes = (
        "priced on your workspace as it is now (a fold holds out "
        f"{' or '.join(map(str, sizes))} demonstrations; evaluate is priced with the trained "
        "methods that have a checkpoint here)",
    )
    return CrossvalCost(tuple(costs), notes)
