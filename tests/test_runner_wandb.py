"""wandb: with a project set and no key, metrics go to an offline run inside the run folder."""

from __future__ import annotations

from test_runner import make_runner, ok_stage

from engine.events import StageFinished
from engine.workspace import Workspace


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
