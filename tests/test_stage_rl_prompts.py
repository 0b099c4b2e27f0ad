"""rl-prompts: one training demo per call, the request filter, train/dev rows in the seed's shape."""

from __future__ import annotations

import json

from conftest import FakeTeacher, needs_backend

from engine.pipeline.runner import Runner, list_runs, load_run_events
from engine.run.events import Metric, StageFailed, StageFinished
from engine.store.config import load_config
from engine.store.split import workspace_split
from engine.store.workspace import Workspace

pytestmark = needs_backend

R = [
    "Email Sam Ortiz, the lab manager, to order two more pipette racks by Friday 5/2.",
    "Write to Prof. Kim to ask for a recommendation letter for the NSF fellowship due Oct 15.",
    "Tell Lena from facilities that the fume hood in room 310 has been beeping since Monday.",
    "Ask Dr. Patel's office whether my March 12 visit was billed to the right insurance plan.",
    "Reply to Jordan declining the invitation to chair the soil session on Tue 6/12.",
    "Let my co-author Wei know the revised figures will be two days late, now due Thu 11/6.",
]

TOML_EXTRA = "\n[rl_prompts]\nteacher_calls = 4\nper_call = 3\ndev_size = 2\n"


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


async def test_rl_prompts_rows_split_and_counts(ws: Workspace):
    ws.config_path.write_text(ws.config_path.read_text() + TOML_EXTRA)
    split = workspace_split(ws, load_config(ws.config_path).data)
    train_inputs = {d["input"] for d in split.train}
    held_inputs = {d["input"] for d in split.holdout}
    calls = iter(range(100))

    def reply(prompt: str) -> str:
        k = next(calls)
        return "\n".join(
            [
                "Here are 3 new requests:",
                f"1. {R[(2 * k) % 6]}",
                f"2. {R[(2 * k + 1) % 6]}",
                "3. I am not a human and I am not a 550-word essay.",
            ]
        )

    svc = FakeTeacher(reply)
    final = await Runner(ws, service_factory=svc).run("rl-prompts")
    assert isinstance(final, StageFinished), final
    assert len(svc.prompts) == 4
    for p in svc.prompts:  # exactly one demonstration per call, never a held-out one
        assert sum(t in p for t in train_inputs) == 1
        assert not any(t in p for t in held_inputs)
    train = _rows(ws.result("rl_train_data.jsonl"))
    dev = _rows(ws.result("rl_dev_data.jsonl"))
    assert len(train) == 4 and len(dev) == 2
    assert sorted(r["prompt_conversation"][-1]["content"] for r in train + dev) == sorted(R)
    prompts = ws.load_prompts()
    for r in train:
        assert set(r) == {"prompt_conversation", "reference", "rubric"}
        assert r["reference"] is None and r["rubric"] == prompts["rubric"].strip()
        assert [m["role"] for m in r["prompt_conversation"]] == ["system", "user"]
        assert r["prompt_conversation"][0]["content"] == prompts["system_prompt"].strip()
    for r in dev:
        assert [m["role"] for m in r["prompt_conversation"]] == ["user"]
        assert r["reference"] is None
    assert "yield 6/12 = 50%" in final.summary
    assert "8 lines filtered" in final.summary and "2 duplicates removed" in final.summary
    (run,) = list_runs(ws, "rl-prompts")
    m = {e.name: e.value for e in load_run_events(run) if isinstance(e, Metric)}
    assert m["rl_prompts/accepted"] == 6 and m["rl_prompts/duplicates"] == 2
    assert m["rl_prompts/filtered"] == 8  # a heading and a self-description per call


async def test_rl_prompts_nothing_usable_fails_clearly(ws: Workspace):
    final = await Runner(
        ws, service_factory=FakeTeacher(lambda p: "I am an AI language model.")
    ).run("rl-prompts")
    assert isinstance(final, StageFailed)
    assert "rl_prompts.teacher_calls" in final.message
    assert not ws.result("rl_train_data.jsonl").exists()


async def test_synth_inputs_never_shows_the_teacher_a_held_out_demo(ws: Workspace):
    split = workspace_split(ws, load_config(ws.config_path).data)
    held_inputs = {d["input"] for d in split.holdout}
    assert held_inputs
    svc = FakeTeacher(lambda prompt: "\n".join(f"{i + 1}. {r}" for i, r in enumerate(R[:3])))
    final = await Runner(ws, service_factory=svc).run("synth-inputs")
    assert isinstance(final, StageFinished), final
    assert svc.prompts
    for p in svc.prompts:
        assert not any(t in p for t in held_inputs)
        assert any(d["input"] in p for d in split.train)
