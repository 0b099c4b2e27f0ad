"""The two writers of results/synthetic_personalized_data.jsonl."""

from __future__ import annotations

import json

from conftest import FakeTeacher, needs_backend

from engine.pipeline.runner import Runner
from engine.run.events import StageFinished
from engine.store import results
from engine.store.workspace import Workspace

R = [
    "Email Sam Ortiz, the lab manager, to order two more pipette racks by Friday 5/2.",
    "Write to Prof. Kim to ask for a recommendation letter for the NSF fellowship due Oct 15.",
    "Tell Lena from facilities that the fume hood in room 310 has been beeping since Monday.",
]


def _row(i: int, status: str = "pending", out: str = "draft") -> dict:
    return {
        "id": f"in-{i + 1:04d}",
        "seed": "s",
        "status": status,
        "messages": [{"role": "user", "content": R[i]}, {"role": "assistant", "content": out}],
        "fixups": [],
    }


def test_review_save_keeps_unparsable_lines_byte_for_byte(tmp_path):
    """A save changes only the touched row; a non-JSON line, a JSON list, a non-UTF-8
    line and a row whose status is a list stay exactly as they were."""
    path = tmp_path / "results" / "synthetic_personalized_data.jsonl"
    path.parent.mkdir()
    bad = [
        b"this is not json",
        b'["a", "json", "list"]',
        b'{"id": "x", "status": ["accepted"], "messages": []}',
        b'{"id": "y", "messages": "not a list"}',
        b"\xff\xfe not utf-8",
    ]
    lines = [json.dumps(_row(0)).encode(), bad[0], bad[1], json.dumps(_row(1)).encode()]
    lines += [bad[2], bad[3], json.dumps(_row(2)).encode(), bad[4]]
    path.write_bytes(b"\n".join(lines) + b"\n")

    loaded = results.read_synthetic_rows(path)
    assert [r["id"] for r in loaded.rows] == ["in-0001", "in-0002", "in-0003"]
    assert [b.line for b in loaded.bad] == [2, 3, 5, 6, 8]
    assert all("synthetic_personalized_data.jsonl: line" in p for p in loaded.problems)

    touched = dict(loaded.rows[1], status="accepted")
    report = results.save_review(path, [touched])
    assert (report.replaced, report.appended, report.kept_unparsed) == (1, 0, 5)
    after = path.read_bytes().split(b"\n")
    assert after[:-1] == [*lines[:3], json.dumps(touched, ensure_ascii=False).encode(), *lines[4:]]


def test_review_save_appends_a_decision_whose_row_is_gone(tmp_path):
    path = tmp_path / "synthetic_personalized_data.jsonl"
    path.write_text(json.dumps(_row(0)) + "\n")
    report = results.save_review(path, [_row(1, "accepted")])
    assert report.appended == 1
    assert [r["id"] for r in results.read_synthetic_rows(path).rows] == ["in-0001", "in-0002"]


@needs_backend
async def test_review_decision_made_while_synth_outputs_runs_survives_its_final_write(
    ws: Workspace,
):
    """The stage (re)generates pending rows; while it runs, the person accepts
    and edits one of them in the review screen; the stage's final write keeps that decision."""
    inputs = [{"id": f"in-{i + 1:04d}", "seed": "s", "input": R[i]} for i in range(3)]
    results.write_synthetic_inputs(ws.result("synthetic_inputs.jsonl"), inputs)
    path = ws.result("synthetic_personalized_data.jsonl")
    results.atomic_write_jsonl(path, [_row(i) for i in range(3)])  # a previous run: all pending
    path.open("ab").write(b"not json, kept\n")

    decision = _row(0, "edited", "Hi Sam —\n\nEdited by the person.\n\nThanks!\n— Maya")
    calls = []

    def reply(prompt: str) -> str:
        calls.append(prompt)
        if len(calls) == 2:  # the stage is mid-run: the review screen saves a decision now
            results.save_review(path, [decision])
        return f"Hi —\n\nGenerated answer {len(calls)}.\n\nThanks!\n— Maya"

    final = await Runner(ws, service_factory=FakeTeacher(reply)).run(
        "synth-outputs", ["synth_outputs.concurrency=1"]
    )
    assert isinstance(final, StageFinished), final
    assert len(calls) == 3  # every pending row was regenerated
    loaded = results.read_synthetic_rows(path)
    by_id = {r["id"]: r for r in loaded.rows}
    assert by_id["in-0001"] == decision  # the decision survived the stage's final write
    assert by_id["in-0002"]["status"] == "pending" and "Generated" in results.row_output(
        by_id["in-0002"]
    )
    assert [r["id"] for r in loaded.rows] == ["in-0001", "in-0002", "in-0003"]
    assert path.read_bytes().endswith(b"not json, kept\n")  # never dropped
