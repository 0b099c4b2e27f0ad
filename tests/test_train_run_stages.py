"""The lifecycle cases a fault probe found, end to end on the tiny model: a changed setting is
never trained over by a reused or resumed run, and every decision is logged in words."""

from __future__ import annotations

from conftest import needs_backend
from test_stage_ditto import ARGS as DITTO_ARGS
from test_stage_ditto import die_in_round_2
from test_stage_rlaif import RULE_TOML, _write_prompts

from engine.pipeline.runner import Runner
from engine.run.events import LogLine, Metric, StageFailed, StageFinished
from engine.store.checkpoints import latest_checkpoint
from engine.store.workspace import Workspace

pytestmark = needs_backend


def _steps(events, name: str) -> list[int]:
    return sorted(e.step for e in events if isinstance(e, Metric) and e.name == name)


def _said(events, text: str) -> bool:
    return any(isinstance(e, LogLine) and text in e.message for e in events)


class _DiesAfter:
    """Wraps a step function so that call ``n + 1`` raises (a crash at that step)."""

    def __init__(self, real, n: int):
        self.real, self.n, self.calls = real, n, 0

    async def __call__(self, *a, **k):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("simulated kill")
        return await self.real(*a, **k)


def _rlaif_ws(ws: Workspace, steps: int, ckpt: int) -> None:
    ws.config_path.write_text(
        ws.config_path.read_text() + RULE_TOML.format(steps=steps, lr=0.05, ckpt=ckpt)
    )
    _write_prompts(ws)


async def test_rlaif_finished_then_other_temperature_trains_again(ws: Workspace):
    _rlaif_ws(ws, steps=2, ckpt=0)
    first = [e async for e in Runner(ws).run_stage("rlaif", [])]
    assert isinstance(first[-1], StageFinished) and _steps(first, "rl/reward") == [1, 2]
    same = [e async for e in Runner(ws).run_stage("rlaif", [])]
    assert _said(same, "reusing it") and not _steps(same, "rl/reward")
    for key, value in (("temperature", "0.5"), ("format_penalty", "0.25")):
        rerun = [e async for e in Runner(ws).run_stage("rlaif", [f"rlaif.{key}={value}"])]
        assert isinstance(rerun[-1], StageFinished), rerun[-1]
        assert _steps(rerun, "rl/reward") == [1, 2], key  # trained again, from the start
        assert _said(rerun, f"rlaif.{key} changed") and not _said(rerun, "reusing it")


async def test_rlaif_killed_then_other_temperature_starts_fresh(ws: Workspace, monkeypatch):
    import engine.stages.rlaif as rl

    _rlaif_ws(ws, steps=4, ckpt=2)
    real = rl.build_training_data
    calls = {"n": 0}

    def dies_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(rl, "build_training_data", dies_at_step_3)
    first = [e async for e in Runner(ws).run_stage("rlaif", [])]
    assert isinstance(first[-1], StageFailed) and "simulated kill" in first[-1].message
    assert latest_checkpoint(ws.results_dir, "rlaif")["step"] == 2
    monkeypatch.setattr(rl, "build_training_data", real)
    rerun = [e async for e in Runner(ws).run_stage("rlaif", ["rlaif.temperature=0.5"])]
    assert isinstance(rerun[-1], StageFinished), rerun[-1]
    assert _steps(rerun, "rl/reward") == [1, 2, 3, 4]  # not 3..4 under other settings
    assert _said(rerun, "rlaif.temperature changed (1.0 -> 0.5)")


async def test_sft_killed_then_other_lr_starts_fresh_and_is_not_reused_later(
    ws: Workspace, monkeypatch
):
    import engine.stages.sft as sft_stage

    args = ["sft.steps=8", "sft.sample_after=false"]
    monkeypatch.setattr(sft_stage, "supervised_step", _DiesAfter(sft_stage.supervised_step, 4))
    await _synthetic_rows(ws)
    first = [e async for e in Runner(ws).run_stage("sft", args)]
    assert isinstance(first[-1], StageFailed)
    assert latest_checkpoint(ws.results_dir, "sft")["step"] == 4
    monkeypatch.undo()
    other = [*args, "sft.lr=0.01", "sft.lr_schedule=linear"]
    rerun = [e async for e in Runner(ws).run_stage("sft", other)]
    assert isinstance(rerun[-1], StageFinished), rerun[-1]
    assert _steps(rerun, "train/loss") == list(range(1, 9))
    assert _said(rerun, "sft.lr changed") and _said(rerun, "sft.lr_schedule changed")
    back = [e async for e in Runner(ws).run_stage("sft", args)]  # the first settings again
    assert _steps(back, "train/loss") == list(range(1, 9)) and _said(back, "sft.lr changed")


async def _synthetic_rows(ws: Workspace) -> None:
    import json

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Write to Ana about item {i}."},
                {"role": "assistant", "content": f"Hi Ana, item {i} is done. Best, M"},
            ],
            "status": "accepted",
        }
        for i in range(8)
    ]
    path = ws.result("synthetic_personalized_data.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


async def test_ditto_fewer_rounds_says_why_and_keeps_the_sft_init(ws: Workspace):
    args = [*DITTO_ARGS, "ditto.sample_after=false"]
    first = [e async for e in Runner(ws).run_stage("ditto", args)]
    assert isinstance(first[-1], StageFinished), first[-1]
    assert latest_checkpoint(ws.results_dir, "sft-demos")["finished"] is True
    fewer = [e async for e in Runner(ws).run_stage("ditto", [*args, "ditto.rounds=1"])]
    assert isinstance(fewer[-1], StageFinished), fewer[-1]
    assert _said(fewer, "ditto.rounds is now 1, below the 2 rounds already trained")
    assert not _steps(fewer, "ditto/sft_loss")  # the SFT initialisation is reused
    assert _said(fewer, "training already finished with these settings")
    assert _steps(fewer, "ditto/dpo_loss") == [1, 2]


async def test_ditto_killed_in_sft_init_resumes_from_its_checkpoint(ws: Workspace, monkeypatch):
    import engine.stages.ditto as ditto_stage

    args = [*DITTO_ARGS, "ditto.sft_stop_loss=0", "ditto.checkpoint_every=1"]
    args += ["ditto.sample_after=false"]
    monkeypatch.setattr(ditto_stage, "supervised_step", _DiesAfter(ditto_stage.supervised_step, 2))
    first = [e async for e in Runner(ws).run_stage("ditto", args)]
    assert isinstance(first[-1], StageFailed)
    assert latest_checkpoint(ws.results_dir, "sft-demos")["step"] == 2
    monkeypatch.undo()
    rerun = [e async for e in Runner(ws).run_stage("ditto", args)]
    assert isinstance(rerun[-1], StageFinished), rerun[-1]
    assert _said(rerun, "resuming from step 2 of 3")
    assert _steps(rerun, "ditto/sft_loss") == [3]


async def test_rlaif_killed_during_dev_evaluation_fills_it_in_on_resume(ws: Workspace, monkeypatch):
    import engine.stages.rlaif as rl

    _rlaif_ws(ws, steps=4, ckpt=2)
    ws.config_path.write_text(
        ws.config_path.read_text().replace("eval_every = 0", "eval_every = 2")
    )
    real = rl._RlLoop.dev_eval

    async def dies(self, step):
        raise RuntimeError("simulated kill")
        yield  # an async generator, like the real one

    monkeypatch.setattr(rl._RlLoop, "dev_eval", dies)
    first = [e async for e in Runner(ws).run_stage("rlaif", [])]
    assert isinstance(first[-1], StageFailed) and not _steps(first, "dev/win_rate")
    assert latest_checkpoint(ws.results_dir, "rlaif")["step"] == 2
    monkeypatch.setattr(rl._RlLoop, "dev_eval", real)
    rerun = [e async for e in Runner(ws).run_stage("rlaif", [])]
    assert isinstance(rerun[-1], StageFinished), rerun[-1]
    assert _steps(rerun, "dev/win_rate") == [2, 4]  # no gap at the checkpoint it resumed from
    assert _steps(rerun, "rl/reward") == [3, 4]


async def test_rlaif_cancel_stops_before_the_next_phase(ws: Workspace, monkeypatch):
    """A cancel while sampling: no judging, no update, no dev evaluation after it."""
    import engine.stages.rlaif as rl

    _rlaif_ws(ws, steps=4, ckpt=0)
    runner = Runner(ws)
    real_gather = rl._gather
    judged = {"n": 0}

    async def gather_then_cancel(futures):
        out = await real_gather(futures)
        runner.cancel()  # arrives while the step samples
        return out

    real_judge = rl.RuleJudge.judge

    async def counting_judge(self, comps):
        judged["n"] += 1
        return await real_judge(self, comps)

    monkeypatch.setattr(rl, "_gather", gather_then_cancel)
    monkeypatch.setattr(rl.RuleJudge, "judge", counting_judge)
    events = [e async for e in runner.run_stage("rlaif", [])]
    assert isinstance(events[-1], StageFailed) and events[-1].cancelled, events[-1]
    assert judged["n"] == 0 and not _steps(events, "rl/reward")


async def test_ditto_with_a_torn_replay_buffer_stops_naming_the_file(ws: Workspace, monkeypatch):
    """A truncated runs/ditto-*/ditto_buffer.json never makes a rerun quietly start over (a
    finished round's checkpoint thrown away): it stops, names the file and says what to do."""
    from pathlib import Path

    die_in_round_2(monkeypatch)
    first = [e async for e in Runner(ws).run_stage("ditto", DITTO_ARGS)]
    assert isinstance(first[-1], StageFailed)
    monkeypatch.undo()
    entry = latest_checkpoint(ws.results_dir, "ditto")
    buffer = Path(entry["buffer_path"])
    buffer.write_text(buffer.read_text()[:40])  # torn mid-write
    rerun = [e async for e in Runner(ws).run_stage("ditto", DITTO_ARGS)]
    assert isinstance(rerun[-1], StageFailed), rerun[-1]
    message = rerun[-1].message
    assert "ditto_buffer.json" in message and "ditto.resume=false" in message
    assert not _steps(rerun, "ditto/dpo_loss") and not _steps(rerun, "ditto/sft_loss")
    assert latest_checkpoint(ws.results_dir, "ditto")["round"] == 1  # the round-1 work is kept
