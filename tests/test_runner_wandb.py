"""wandb: with a project set and no key, metrics go to an offline run inside the run folder."""

from __future__ import annotations

from test_runner import make_runner, ok_stage

from engine.run.events import StageFinished
from engine.store.workspace import Workspace


async def test_wandb_offline(ws: Workspace, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    final = await make_runner(ws, baseline=ok_stage).run(
        "baseline", ['wandb.project="persona-test"']
    )
    assert isinstance(final, StageFinished)
    run_dir = next(ws.runs_dir.iterdir())
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, list(run_dir.rglob("*"))[:20]


async def test_wandb_failure_is_a_warning_not_a_failure(ws: Workspace, monkeypatch):
    import wandb

    from engine.run.events import LogLine

    def broken_init(**_kw):
        raise RuntimeError("no wandb here")

    monkeypatch.setattr(wandb, "init", broken_init)
    events = [
        e
        async for e in make_runner(ws, baseline=ok_stage).run_stage(
            "baseline", ['wandb.project="persona-test"']
        )
    ]
    assert isinstance(events[-1], StageFinished)
    warnings = [e for e in events if isinstance(e, LogLine) and e.level == "warning"]
    assert [w.message for w in warnings] == ["wandb disabled: no wandb here"]
