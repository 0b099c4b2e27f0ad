"""DITTO stage: the DPO loss by hand, and end to end on the tiny model (SFT init, rounds,
checkpoints, a stop after round 1 then resume, a frozen reference, the output file)."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch
from conftest import needs_backend

from engine.pipeline.runner import Runner
from engine.run.events import (
    CheckpointSaved,
    LogLine,
    Metric,
    StageFailed,
    StageFinished,
)
from engine.stages.ditto import dpo_loss
from engine.stages.ditto_pairs import ReplayBuffer
from engine.store.workspace import Workspace

ARGS = [
    "ditto.rounds=2",
    "ditto.steps_per_round=2",
    "ditto.sft_max_steps=3",
    "ditto.sft_lr=0.01",
    "ditto.lr=0.01",
    "ditto.samples_per_demo=2",
    "ditto.batch_prompts=2",
    "ditto.pairs_per_prompt=2",
    "ditto.max_tokens=8",
    "ditto.rank=4",
    "ditto.max_length=256",
    "sampling.max_tokens=8",
]


def test_dpo_loss_and_gradient_by_hand():
    beta = 0.5
    # two pairs, per-token policy log-probs; the first token of each sequence is not scored
    pol = [
        torch.tensor([-9.0, -1.0, -2.0], requires_grad=True),  # pair 1 chosen:  -3.0
        torch.tensor([-9.0, -0.5, -0.5], requires_grad=True),  # pair 1 rejected: -1.0
        torch.tensor([-9.0, -1.0, -1.0], requires_grad=True),  # pair 2 chosen:  -2.0
        torch.tensor([-9.0, -4.0, -1.0], requires_grad=True),  # pair 2 rejected: -5.0
    ]
    weights = [torch.tensor([0.0, 1.0, 1.0])] * 4
    ref = [
        torch.tensor([0.0, -2.0, -2.0]),  # -4
        torch.tensor([0.0, -1.0, -1.0]),  # -2
        torch.tensor([0.0, -1.5, -1.5]),  # -3
        torch.tensor([0.0, -2.0, -2.0]),  # -4
    ]
    loss, metrics = dpo_loss(pol, weights, ref, beta)
    # pair 1: (−3+4) − (−1+2) = 0 ; pair 2: (−2+3) − (−5+4) = 2
    margins = [0.0, 2.0]
    want = sum(math.log1p(math.exp(-beta * m)) for m in margins) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(0.5)  # 0 is not a win, 2 is
    assert metrics["margin"] == pytest.approx(beta * 1.0)
    assert metrics["chosen_reward"] == pytest.approx(beta * (1.0 + 1.0) / 2)
    assert metrics["rejected_reward"] == pytest.approx(beta * (1.0 + -1.0) / 2)
    loss.backward()
    for i, m in enumerate(margins):
        g = beta * (1 / (1 + math.exp(beta * m))) / 2  # |dL/dlogp| per scored token
        chosen, rejected = pol[2 * i].grad, pol[2 * i + 1].grad
        assert chosen[0] == 0 and rejected[0] == 0  # unweighted token: no gradient
        assert chosen[1:].tolist() == pytest.approx([-g, -g], rel=1e-6)  # push chosen up
        assert rejected[1:].tolist() == pytest.approx([g, g], rel=1e-6)  # push rejected down


def _metrics(events, name):
    return {e.step: e.value for e in events if isinstance(e, Metric) and e.name == name}


def _registry(ws: Workspace) -> dict:
    return tomllib.loads(ws.result("checkpoints.toml").read_text())["ditto"]


@needs_backend
def die_in_round_2(monkeypatch) -> None:
    """DITTO dies in round 2 right after its sampling (as a kill -9 would: nothing more is
    written), before any round-2 step. ``monkeypatch.undo()`` brings the real one back."""
    import engine.stages.ditto as ditto_stage

    real_draw = ditto_stage.draw_pairs

    def dies_in_round_2(demos, buffer, current_round, *a, **k):
        if current_round == 2:
            raise RuntimeError("simulated kill")
        return real_draw(demos, buffer, current_round, *a, **k)

    monkeypatch.setattr(ditto_stage, "draw_pairs", dies_in_round_2)


async def test_ditto_end_to_end_kill_resume_and_reuse(ws: Workspace, monkeypatch):
    import engine.stages.ditto as ditto_stage

    # 1. a run dies in round 2 right after its sampling, before any round-2 step
    real_draw = ditto_stage.draw_pairs
    die_in_round_2(monkeypatch)
    first = [e async for e in Runner(ws).run_stage("ditto", ARGS)]
    assert isinstance(first[-1], StageFailed) and "simulated kill" in first[-1].message
    monkeypatch.setattr(ditto_stage, "draw_pairs", real_draw)
    names = [e.name for e in first if isinstance(e, CheckpointSaved)]
    assert names == ["sft-init", "round-1"]
    sft = _metrics(first, "ditto/sft_loss")
    assert 1 <= len(sft) <= 3 and _metrics(first, "ditto/sft_stop_loss")
    assert sorted(_metrics(first, "ditto/dpo_loss")) == [1, 2]
    counts = _metrics(first, "ditto/pairs_online")
    assert counts == {1: 4.0, 2: 4.0}  # round 1: every pair falls back to online
    assert _metrics(first, "ditto/pairs_replay") == {1: 0.0, 2: 0.0}
    for name in ("chosen_reward", "rejected_reward", "margin", "pair_accuracy"):
        assert sorted(_metrics(first, f"ditto/{name}")) == [1, 2]
    assert any(isinstance(e, LogLine) and "demonstration:" in e.message for e in first)
    reg = _registry(ws)
    assert reg["round"] == 1 and reg["finished"] is False and reg["checkpoint"] == "round-1"
    assert reg["reference_path"].endswith("/sft-init")
    buf = ReplayBuffer.load(reg["buffer_path"])
    assert buf.rounds() == [1, 2]  # round 2 was sampled before the stop
    assert {s.checkpoint for s in buf.samples if s.round == 2} == {"round-1"}

    holdout = json.loads((ws.data_dir / "holdout.json").read_text())["holdout"]
    split_holdout = set(holdout)
    assert split_holdout and not split_holdout & {s.request for s in buf.samples}

    # 2. rerun: resumes after round 1 with the buffer intact, trains round 2 only
    second = [e async for e in Runner(ws).run_stage("ditto", ARGS)]
    assert isinstance(second[-1], StageFinished), second[-1]
    msgs = [e.message for e in second if isinstance(e, LogLine)]
    assert any(m.startswith("resuming after round 1/2") for m in msgs), msgs
    assert any("reusing 16 samples of round-1" in m for m in msgs), msgs
    assert not _metrics(second, "ditto/sft_loss")
    assert sorted(_metrics(second, "ditto/dpo_loss")) == [3, 4]
    assert sum(_metrics(second, "ditto/pairs_online").values()) < 8  # replay/intermodel now exist
    # the reference is bit-identical through both runs and every round
    ref = {
        **_metrics(first, "ditto/reference_logprob"),
        **_metrics(second, "ditto/reference_logprob"),
    }
    assert sorted(ref) == [1, 2] and ref[1] == ref[2]
    reg = _registry(ws)
    assert reg["round"] == 2 and reg["finished"] is True and reg["step"] == 4
    buf2 = ReplayBuffer.load(reg["buffer_path"])
    assert [s for s in buf2.samples if s.round == 1] == [s for s in buf.samples if s.round == 1]
    rows = json.loads(ws.result("ditto_model_outputs.json").read_text())
    demos = ws.load_demos()
    assert [r["input"] for r in rows] == [d["input"] for d in demos]  # held-out ones included
    assert split_holdout <= {r["input"] for r in rows}
    assert all(set(r) == {"input", "expected_output", "output"} for r in rows)

    # 3. a finished training is reused: only the sampling runs again
    ws.result("ditto_model_outputs.json").unlink()
    third = [e async for e in Runner(ws).run_stage("ditto", ARGS)]
    assert isinstance(third[-1], StageFinished), third[-1]
    assert any(isinstance(e, LogLine) and "sampling only" in e.message for e in third)
    assert not _metrics(third, "ditto/dpo_loss") and not _metrics(third, "ditto/sft_loss")
    assert ws.result("ditto_model_outputs.json").exists()


@needs_backend
async def test_update_reference_moves_it_each_round(ws: Workspace):
    args = [*ARGS, "ditto.update_reference=true", "ditto.sample_after=false"]
    events = [e async for e in Runner(ws).run_stage("ditto", args)]
    assert isinstance(events[-1], StageFinished), events[-1]
    ref = _metrics(events, "ditto/reference_logprob")
    assert sorted(ref) == [1, 2] and ref[1] != ref[2]
    assert _registry(ws)["reference_path"].endswith("/round-1")
    assert not ws.result("ditto_model_outputs.json").exists()
