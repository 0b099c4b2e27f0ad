"""What a cross-validation costs before it is launched: k × each fold stage's estimate
(engine.pipeline.estimate) plus the shared stages once.

A fold stage is priced on a scratch copy of the largest fold's workspace (its held-out slice
fixed, as the fold will have it), with a registry entry for each trained method the fold will
evaluate, so evaluate is priced with every planned method; the shared stages on the person's
workspace. Nothing is written outside a temporary folder."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.crossval.folds import METHOD_STAGES, prepare_workspace
from engine.crossval.plan import CrossvalPlan
from engine.pipeline.estimate import EstimateError, estimate_stage, human_seconds
from engine.store.checkpoints import record_checkpoint
from engine.store.workspace import Workspace


@dataclass(frozen=True)
class StageCost:
    stage: str
    times: int  # how many times it runs: k, or 1 for a shared stage
    seconds: float | None  # one run; None: no estimate (``why`` says why)
    why: str = ""
    upper_bound: bool = False
    assumptions: tuple[str, ...] = ()  # Estimate.assumed(): the upper bound's note included

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


def _scratch_fold(plan: CrossvalPlan, workspace: Workspace, root: Path, policy: str) -> Workspace:
    """The largest fold's workspace under ``root``, with a stand-in registry entry for each
    trained method (the estimate reads their names and contexts, never their weights)."""
    largest = max(range(plan.k), key=lambda i: len(plan.holdouts[i]))
    fold = prepare_workspace(workspace, root / "fold", plan.holdouts[largest])
    for m in plan.methods:
        if METHOD_STAGES.get(m):
            record_checkpoint(fold.results_dir, m, sampler_path="(estimate)", base_model=policy)
    return fold


def estimate_crossval(
    plan: CrossvalPlan, workspace: Workspace, profiles: Mapping[str, Any]
) -> CrossvalCost | None:
    """None on the Tinker backend (no estimate there)."""
    overrides = [*plan.overrides, f"evaluate.methods={json.dumps(plan.methods)}"]
    cfg = workspace.config(overrides, plan.backend)
    if cfg.backend.name != "local":
        return None
    costs = []
    with tempfile.TemporaryDirectory(prefix="persona-crossval-estimate-") as tmp:
        fold = _scratch_fold(plan, workspace, Path(tmp), cfg.model("policy"))
        runs = [(s, 1, workspace) for s in plan.shared] + [(s, plan.k, fold) for s in plan.stages]
        for stage, times, ws in runs:
            try:
                est = estimate_stage(stage, cfg, ws, profiles)
            except EstimateError as e:
                costs.append(StageCost(stage, times, None, str(e)))
                continue
            if est is None:
                return None
            costs.append(
                StageCost(
                    stage, times, est.seconds, upper_bound=est.upper_bound,
                    assumptions=tuple(est.assumed()),
                )
            )  # fmt: skip
    sizes = sorted({len(f) for f in plan.folds})
    notes = (
        f"priced on the largest fold ({max(sizes)} demonstrations held out, "
        f"{sum(map(len, plan.folds)) - max(sizes)} for training)",
    )
    return CrossvalCost(tuple(costs), notes)
