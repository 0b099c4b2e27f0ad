"""Stage progress moves per request finished, not per batch: a person never watches 0/N for
most of a run."""

from __future__ import annotations

import json

from conftest import FakeTeacher, needs_backend

from engine.pipeline.runner import Runner, list_runs, load_run_events
from engine.run.events import Progress, StageFinished
from engine.store.workspace import Workspace

pytestmark = needs_backend


async def test_synth_inputs_progress_moves_per_teacher_reply(ws: Workspace):
    def reply(prompt: str) -> str:  # two seeds; the first one short, so it is asked again
        if "research project communication" in prompt and "Write 3 new" in prompt:
            return json.dumps(["Email Sam Ortiz to order two pipette racks by Friday 5/2."])
        return json.dumps([f"Write to Dr. Lee about the visit on {d}/3." for d in range(1, 4)])

    final = await Runner(ws, service_factory=FakeTeacher(reply)).run("synth-inputs")
    assert isinstance(final, StageFinished), final
    (run,) = list_runs(ws, "synth-inputs")
    steps = [(e.done, e.total) for e in load_run_events(run) if isinstance(e, Progress)]
    replies = (run / "teacher_replies.jsonl").read_text().splitlines()
    # one step per teacher reply (first attempts and retries), each done <= total
    assert [d for d, _ in steps] == list(range(len(replies) + 1))
    assert len(replies) > 2 and steps[-1] == (len(replies), len(replies))  # retries counted
    assert all(d <= t for d, t in steps)
