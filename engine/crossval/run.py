"""Running a cross-validation: every fold's stages through the normal runner, then the pool.

    cv = Crossval(workspace, plan)          # engine.crossval.plan.choose_plan gives the plan
    async for item in cv.run():             # FoldEvent per stage event, then the final event
        ...
    cv.cancel()                             # from anywhere: the stage in flight stops as usual

The stages shared by every fold (baseline, prompting: independent of the split) run once in
``shared/`` and their outputs are copied into each fold's results/. Then fold 1's stages, fold
2's, ... each in its own workspace through ``engine.pipeline.runner.Runner``, so resume, checkpoints,
events and cancel behave as everywhere. A fold stage whose last run finished is not run again:
a cancelled or killed cross-validation continues with the first unfinished fold stage.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from engine.crossval.folds import CrossvalError, absolute_path_overrides, prepare_workspace
from engine.crossval.plan import CrossvalPlan, list_plans, load_plan
from engine.pipeline.runner import Listener, Runner, StageStatus, list_runs, run_state
from engine.run.events import Event, StageFailed, StageFinished
from engine.store.workspace import Workspace

STAGE = "crossval"
TITLE = "Cross-validation: every demonstration held out once"
POOLED = ("crossval_report.md", "crossval.json")


@dataclass(frozen=True)
class FoldEvent:
    """One stage event of the cross-validation, placed: fold ``fold`` of ``folds`` (0 = the
    shared stages), position ``index`` of ``total`` fold stages."""

    fold: int
    folds: int
    stage: str
    index: int
    total: int
    event: Event

    @property
    def where(self) -> str:
        head = "shared" if self.fold == 0 else f"fold {self.fold}/{self.folds}"
        return f"{head} · {self.stage}"


def stage_done(ws: Workspace, stage: str) -> bool:
    """The stage's latest run in ``ws`` finished."""
    runs = list_runs(ws, stage)
    return bool(runs) and run_state(runs[-1])[0] == "done"


def fold_stages(plan: CrossvalPlan) -> list[tuple[int, str]]:
    """Every (fold, stage) in the order they run; fold 0 is the shared workspace."""
    return [(0, s) for s in plan.shared] + [
        (i, s) for i in range(1, plan.k + 1) for s in plan.stages
    ]


def pending(plan: CrossvalPlan) -> list[tuple[int, str]]:
    """The fold stages not finished yet."""
    return [
        (i, s)
        for i, s in fold_stages(plan)
        if not (plan.fold_dir(i) / "persona.toml").exists()
        or not stage_done(Workspace(plan.fold_dir(i)), s)
    ]


def crossval_status(ws: Workspace) -> StageStatus:
    """The latest cross-validation as one status (the Train tab's crossval row): "not run",
    "done" (pooled), "running" (a fold stage runs, in this process or another), "unfinished"
    (fold stages left: running it again continues) or "failed" (its plan cannot be read)."""
    outputs = [ws.rel(p) for name in POOLED if (p := ws.result(name)).exists()]
    st = StageStatus(STAGE, 0, TITLE, True, "not run", outputs=outputs)
    plans = list_plans(ws)
    if not plans:
        return st
    st.run_dir = ws.rel(plans[-1])
    try:
        plan = load_plan(plans[-1])
    except CrossvalError as e:
        st.state, st.message = "failed", str(e)
        return st
    report = ws.result(POOLED[0])
    if plan.finished:
        st.state, st.message = "done", plan.describe()
        st.finished_at = report.stat().st_mtime if report.exists() else None
        return st
    todo, total = pending(plan), len(fold_stages(plan))
    st.state = "unfinished"
    if todo:
        i, stage = todo[0]
        runs = list_runs(Workspace(plan.fold_dir(i)), stage) if plan.fold_dir(i).exists() else []
        if runs and run_state(runs[-1])[0] == "running":
            st.state = "running"
        st.message = (
            f"{len(todo)} of {total} fold stages left; next: "
            + ("shared" if i == 0 else f"fold {i}/{plan.k}")
            + f" · {stage}"
        )
    else:
        st.message = f"every fold stage ran ({total}); the pooling did not finish"
    return st


class Crossval:
    def __init__(
        self, workspace: Workspace, plan: CrossvalPlan, *, listeners: Iterable[Listener] = ()
    ) -> None:
        self.workspace = workspace
        self.plan = plan
        self.listeners = list(listeners)
        self._runner: Runner | None = None
        self._cancelled = False

    def cancel(self) -> None:
        """Stop after the running stage's current step (as its own cancel does)."""
        self._cancelled = True
        if self._runner is not None:
            self._runner.cancel()

    def abandon(self, message: str) -> None:
        """Quit now (a second interrupt): close the running stage's log (Runner.abandon)."""
        if self._runner is not None:
            self._runner.abandon(message)

    def _workspace(self, i: int) -> Workspace:
        plan = self.plan
        holdout = None if i == 0 else plan.holdouts[i - 1]
        ws = prepare_workspace(self.workspace, plan.fold_dir(i), holdout)
        if i and plan.shared:  # the shared stages' outputs, once they are there
            from engine.stages import STAGES

            shared = Workspace(plan.fold_dir(0))
            for stage in plan.shared:
                for rel in STAGES[stage].outputs:
                    src, dst = shared.root / rel, ws.root / rel
                    if src.exists() and not dst.exists():
                        shutil.copy2(src, dst)
        return ws

    def _overrides(self, stage: str) -> list[str]:
        out = absolute_path_overrides(self.plan.overrides, self.workspace)
        if stage == "evaluate":  # the compared methods, nothing else the fold may hold
            import json

            out.append(f"evaluate.methods={json.dumps(self.plan.methods)}")
        return out

    async def run(self) -> AsyncIterator[FoldEvent | Event]:
        """Each unfinished fold stage's events (as FoldEvent), then a StageFinished (pooled
        results written) or StageFailed of stage ``crossval``."""
        plan = self.plan
        plan.root.mkdir(parents=True, exist_ok=True)
        plan.save()
        todo = fold_stages(plan)
        for index, (i, stage) in enumerate(todo, start=1):
            ws = self._workspace(i)
            if stage_done(ws, stage):
                continue
            if self._cancelled:
                yield self._stopped(i, stage)
                return
            self._runner = runner = Runner(ws, listeners=self.listeners)
            final: Event | None = None
            try:
                async for ev in runner.run_stage(stage, self._overrides(stage), plan.backend):
                    if self._cancelled:  # asked before the runner was listening
                        runner.cancel()
                    final = ev
                    yield FoldEvent(i, plan.k, stage, index, len(todo), ev)
            finally:
                self._runner = None
            if isinstance(final, StageFailed):
                where = "the shared stages" if i == 0 else f"fold {i}/{plan.k}"
                if final.cancelled or self._cancelled:
                    yield self._stopped(i, stage)
                else:
                    yield StageFailed(stage=STAGE, message=f"{where}, {stage}: {final.message}")
                return
        yield await self._pool()

    def _stopped(self, i: int, stage: str) -> StageFailed:
        where = "the shared stages" if i == 0 else f"fold {i}/{self.plan.k}"
        return StageFailed(
            stage=STAGE,
            cancelled=True,
            message=f"crossval was stopped in {where} ({stage}). Run `persona crossval` again "
            "to continue with the first unfinished fold stage.",
        )

    async def _pool(self) -> Event:
        import asyncio

        from engine.crossval.pool import write_pooled
        from engine.errors import PersonaError

        try:
            written, summary = await asyncio.to_thread(write_pooled, self.workspace, self.plan)
        except PersonaError as e:
            return StageFailed(stage=STAGE, message=str(e))
        self.plan.finished = True
        self.plan.save()
        return StageFinished(
            stage=STAGE, outputs=tuple(self.workspace.rel(p) for p in written), summary=summary
        )


__all__ = [
    "STAGE",
    "Crossval",
    "FoldEvent",
    "crossval_status",
    "fold_stages",
    "pending",
    "stage_done",
]
