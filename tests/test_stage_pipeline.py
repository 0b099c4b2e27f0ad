"""Every stage end to end on the tiny model in one temporary workspace, with fake keys in .env:
the content of what each stage writes, the checkpoint registry, and no secret in any written file."""

from __future__ import annotations

import asyncio
import json
import tomllib

import pytest
from conftest import make_tiny_workspace, needs_backend, scripted_teacher_factory

from engine.pipeline.runner import Runner, list_runs, load_run_events, stage_status
from engine.run.events import CheckpointSaved, Metric, SampleProduced, StageFinished

pytestmark = needs_backend

FAKE_TINKER = "tk-FAKE-0123456789abcdef"
FAKE_WANDB = "wb-FAKE-fedcba9876543210"
CHAIN = ["demos", "baseline", "prompting", "synth-inputs", "synth-outputs", "sft"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    ws = make_tiny_workspace(tmp_path_factory.mktemp("chain") / "ws")
    ws.env_path.write_text(f"TINKER_API_KEY={FAKE_TINKER}\nWANDB_API_KEY={FAKE_WANDB}\n")

    async def go():
        out = {}
        for stage in CHAIN:
            events = [
                e
                async for e in Runner(ws, service_factory=scripted_teacher_factory).run_stage(stage)
            ]
            out[stage] = events
        return out

    return ws, asyncio.run(go())


def test_every_stage_finished(chain):
    ws, events = chain
    for stage in CHAIN:
        assert isinstance(events[stage][-1], StageFinished), (stage, events[stage][-1])
    states = {s.name: s.state for s in stage_status(ws)}
    assert all(states[s] == "done" for s in CHAIN)


@pytest.mark.parametrize(
    ("stage", "name"),
    [
        ("baseline", "baseline_results.json"),
        ("prompting", "prompt_engineering_results.json"),
        ("sft", "sft_model_outputs.json"),
    ],
)
def test_policy_outputs(chain, stage, name):
    ws, events = chain
    rows = json.loads(ws.result(name).read_text())
    demos = ws.load_demos()
    assert [r["input"] for r in rows] == [d["input"] for d in demos]
    assert [r["expected_output"] for r in rows] == [d["output"] for d in demos]
    assert all(isinstance(r["output"], str) for r in rows) and any(
        r["output"].strip() for r in rows
    )
    assert all("<|im_end|>" not in r["output"] for r in rows)
    samples = [e for e in events[stage] if isinstance(e, SampleProduced)]
    assert len(samples) == len(demos) and {s.source for s in samples} == {stage}


def test_synthetic_files(chain):
    ws, events = chain
    inputs = [json.loads(x) for x in ws.result("synthetic_inputs.jsonl").read_text().splitlines()]
    # 2 seeds x 3 requests asked; the file holds exactly what the stage counted as valid.
    valid = [
        e
        for e in events["synth-inputs"]
        if isinstance(e, Metric) and e.name == "synth_inputs/valid"
    ]
    assert len(inputs) == int(valid[-1].value) >= 1
    assert f"yield {len(inputs)}/6 " in events["synth-inputs"][-1].summary
    assert {r["seed"] for r in inputs} <= set(ws.load_prompts()["seeds"][:2])
    assert all(r["input"].strip() for r in inputs)
    data = [
        json.loads(x)
        for x in ws.result("synthetic_personalized_data.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in data] == [r["id"] for r in inputs]
    for r in data:
        assert r["status"] in ("pending", "rejected")
        assert [m["role"] for m in r["messages"]][-2:] == ["user", "assistant"]


def test_sft_metrics_checkpoints_registry(chain):
    ws, events = chain
    ev = events["sft"]
    train = [e for e in ev if isinstance(e, Metric) and e.name == "train/loss"]
    val = [e for e in ev if isinstance(e, Metric) and e.name == "val/loss"]
    assert [e.step for e in train] == [1, 2, 3, 4]
    assert [e.step for e in val] == [0, 1, 2, 3, 4]
    assert all(8 < e.value < 13 for e in train + val)  # ~ln(49152) for a random model
    ckpts = [e for e in ev if isinstance(e, CheckpointSaved)]
    assert [(c.name, c.step) for c in ckpts] == [("step-000002", 2), ("final", 4)]
    reg = tomllib.loads(ws.result("checkpoints.toml").read_text())["sft"]
    assert (
        reg["step"] == 4
        and reg["finished"] is True
        and reg["sampler_path"] == ckpts[-1].sampler_path
    )
    assert reg["state_path"] == ckpts[-1].state_path and reg["base_model"] == "persona/tiny-random"
    (run,) = list_runs(ws, "sft")
    assert reg["run"] == f"runs/{run.name}"
    snap = tomllib.loads((run / "config.toml").read_text())
    assert snap["sft"]["steps"] == 4
    assert len(load_run_events(run)) == len(ev)


def test_no_secret_in_any_written_file(chain):
    ws, _ = chain
    checked = 0
    for p in ws.root.rglob("*"):
        if not p.is_file() or p == ws.env_path:
            continue
        blob = p.read_bytes()
        assert FAKE_TINKER.encode() not in blob, p
        assert FAKE_WANDB.encode() not in blob, p
        checked += 1
    assert checked > 20
