"""synth-inputs and synth-outputs with a scripted teacher: parsing, yield, retries, fix-ups, review status."""

from __future__ import annotations

import json

from conftest import FakeTeacher, needs_backend

from engine.pipeline.runner import Runner, list_runs
from engine.run.events import LogLine, Metric, StageFailed, StageFinished
from engine.store.workspace import Workspace

pytestmark = needs_backend

R = [
    "Email Sam Ortiz, the lab manager, to order two more pipette racks by Friday 5/2.",
    "Write to Prof. Kim to ask for a recommendation letter for the NSF fellowship due Oct 15.",
    "Tell Lena from facilities that the fume hood in room 310 has been beeping since Monday.",
    "Ask Dr. Patel's office whether my March 12 visit was billed to the right insurance plan.",
]


async def test_synth_inputs_parses_dedupes_retries_and_reports_yield(ws: Workspace):
    demo_input = ws.load_demos()[0]["input"]

    def reply(prompt: str) -> str:
        if "research project communication" in prompt:
            if "Write 3 new" in prompt:  # first attempt: JSON, one copy of a demo, one duplicate
                return json.dumps([R[0], demo_input, R[0].upper()])
            return f"Sure! Here are more:\n1. {R[1]}\n2. ok\n"  # retry asks for the 2 still missing
        return f"- {R[2]}\n- {R[3]}\n- {R[2]}\n"

    final = await Runner(ws, service_factory=FakeTeacher(reply)).run("synth-inputs")
    assert isinstance(final, StageFinished), final
    rows = [json.loads(x) for x in ws.result("synthetic_inputs.jsonl").read_text().splitlines()]
    assert [r["input"] for r in rows] == [R[0], R[1], R[2], R[3]]
    assert [r["seed"] for r in rows] == ["research project communication"] * 2 + [
        "turn down request"
    ] * 2
    assert [r["id"] for r in rows] == ["in-0001", "in-0002", "in-0003", "in-0004"]
    assert "yield 4/6 = 67%" in final.summary
    (run,) = list_runs(ws, "synth-inputs")
    replies = [json.loads(x) for x in (run / "teacher_replies.jsonl").read_text().splitlines()]
    assert len(replies) == 4  # 2 attempts for the first seed, 2 for the second (still short)
    from engine.pipeline.runner import load_run_events

    ys = [
        e.value
        for e in load_run_events(run)
        if isinstance(e, Metric) and e.name == "synth_inputs/yield"
    ]
    assert abs(ys[-1] - 4 / 6) < 1e-9


async def test_synth_inputs_zero_yield_fails_clearly(ws: Workspace):
    before = ws.result("synthetic_inputs.jsonl").exists()
    final = await Runner(ws, service_factory=FakeTeacher(lambda p: "!!! ###")).run("synth-inputs")
    assert isinstance(final, StageFailed)
    assert "yield 0/6" in final.message and "synth_inputs.retries" in final.message
    assert ws.result("synthetic_inputs.jsonl").exists() == before


def _write_inputs(ws: Workspace, n: int = 3) -> None:
    rows = [{"id": f"in-{i + 1:04d}", "seed": "s", "input": R[i]} for i in range(n)]
    ws.result("synthetic_inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


async def test_synth_outputs_fixups_status_and_format(ws: Workspace):
    _write_inputs(ws)
    replies = [
        "Sure! Here's the email:\n\nHi Sam —\n\nCan you order two racks by Fri 5/2?\n\nThanks!\n— Maya\n\nIf you want, I can shorten it.",
        "Hi Prof. Kim —\n\nWould you write a letter for my NSF application (due Tue 10/15)?<|im_end|>",
        "<|im_start|>",
    ]
    svc = FakeTeacher(replies)
    final = await Runner(ws, service_factory=svc).run(
        "synth-outputs", ["synth_outputs.concurrency=1", 'synth_outputs.signoff="— Maya"']
    )
    assert isinstance(final, StageFinished), final
    rows = [
        json.loads(x)
        for x in ws.result("synthetic_personalized_data.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in rows] == ["in-0001", "in-0002", "in-0003"]
    roles = [m["role"] for m in rows[0]["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert rows[0]["messages"][0]["content"] == ws.load_prompts()["system_prompt"].strip()
    assert rows[0]["messages"][1]["content"] == R[0]
    assert (
        rows[0]["messages"][2]["content"]
        == "Hi Sam —\n\nCan you order two racks by Fri 5/2?\n\nThanks!\n— Maya"
    )
    assert {"preamble", "closing_offer"} <= set(rows[0]["fixups"])
    assert rows[1]["messages"][2]["content"].endswith("(due Tue 10/15)?\n\n— Maya")
    assert "<|im_end|>" not in rows[1]["messages"][2]["content"]
    assert [r["status"] for r in rows] == ["pending", "pending", "rejected"]
    assert rows[2]["reason"] == "empty after fix-ups"
    assert "system" in svc.prompts[0] and R[0] in svc.prompts[0]

    # the user reviews; a rerun keeps reviewed rows and regenerates the rest
    rows[0]["status"] = "accepted"
    rows[1]["status"] = "edited"
    rows[1]["messages"][2]["content"] = "Hi Prof. Kim —\n\nEdited by me.\n\nThanks!\n— Maya"
    ws.result("synthetic_personalized_data.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    svc2 = FakeTeacher(["Hi Lena —\n\nThe hood beeps.\n\nThanks!\n— Maya"])
    final = await Runner(ws, service_factory=svc2).run("synth-outputs")
    assert isinstance(final, StageFinished)
    rows2 = [
        json.loads(x)
        for x in ws.result("synthetic_personalized_data.jsonl").read_text().splitlines()
    ]
    assert rows2[:2] == rows[:2]
    assert rows2[2]["status"] == "pending" and rows2[2]["messages"][2]["content"].startswith(
        "Hi Lena"
    )
    assert len(svc2.prompts) == 1


async def test_synth_outputs_critique_revise(ws: Workspace):
    _write_inputs(ws, 1)
    svc = FakeTeacher(
        [
            "Hey Sam, order racks.",
            "Greeting lacks the em dash; no sign-off.",
            "Hi Sam —\n\nPlease order two racks by Fri 5/2.\n\nThanks!\n— Maya",
        ]
    )
    final = await Runner(ws, service_factory=svc).run(
        "synth-outputs", ["synth_outputs.critique=true"]
    )
    assert isinstance(final, StageFinished)
    (row,) = [
        json.loads(x)
        for x in ws.result("synthetic_personalized_data.jsonl").read_text().splitlines()
    ]
    assert row["draft"] == "Hey Sam, order racks."
    assert row["messages"][-1]["content"].startswith("Hi Sam —\n\nPlease order")
    assert len(svc.prompts) == 3
    assert (
        "Hey Sam, order racks." in svc.prompts[1] and "Greeting lacks the em dash" in svc.prompts[2]
    )


async def test_synth_outputs_needs_inputs(ws: Workspace):
    final = await Runner(ws, service_factory=FakeTeacher([])).run("synth-outputs")
    assert isinstance(final, StageFailed)
    assert (
        "results/synthetic_inputs.jsonl not found" in final.message
        and "synth-inputs" in final.message
    )


async def test_stage_logs_are_events(ws: Workspace):
    _write_inputs(ws, 1)
    events = [
        e
        async for e in Runner(
            ws, service_factory=FakeTeacher(["Hi —\n\nx y z\n\nThanks!"])
        ).run_stage("synth-outputs")
    ]
    assert any(isinstance(e, LogLine) and "loading teacher" in e.message for e in events)
