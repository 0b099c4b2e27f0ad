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
    assert len(warnings) == 1
    assert warnings[0].message.startswith("wandb disabled: no wandb here; the metrics stay in")


async def test_wandb_with_a_key_and_no_network_is_bounded_and_said_once(ws: Workspace, monkeypatch):
    """A key and no network held a baseline for 1 min 46 s. The wait is bounded
    by backend.connect_timeout (like the Tinker connection) and said once. The "network" is
    a 127.0.0.1 port nothing listens on."""
    import socket

    from engine.run.events import LogLine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (ws.root / ".env").write_text("WANDB_API_KEY=" + "k" * 40 + "\n")
    events = [
        e
        async for e in make_runner(ws, baseline=ok_stage).run_stage(
            "baseline", ['wandb.project="persona-test"', "backend.connect_timeout=2"]
        )
    ]
    assert isinstance(events[-1], StageFinished)
    warnings = [e.message for e in events if isinstance(e, LogLine) and e.level == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith("wandb disabled: "), warnings
    assert "at most backend.connect_timeout = 2 s" in warnings[0] and "\n" not in warnings[0]
    assert "k" * 40 not in warnings[0]
