"""Torn lines in human_preferences.jsonl are named by the readers that skip
them (evaluate, reward-model's validation); undoing the pick appended after a torn line
leaves the file byte for byte as it was; a truncated events.jsonl replays with a note about
the cut, and its run's status says the log is cut rather than "killed or crashed"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import needs_backend

from engine.pipeline.runner import Runner, list_runs, load_run_events, stage_status
from engine.run.events import LogLine, Metric, StageFinished, StageStarted, event_to_dict
from engine.store import results
from engine.store.workspace import Workspace

CORPUS = Path(__file__).resolve().parent.parent / "data" / "malformed" / "preferences"
TORN = b'{"input": "x", "a": "sft", "b": "baseline", "cho'


def test_undo_after_a_torn_line_restores_the_file_byte_for_byte(tmp_path: Path):
    path = results.preferences_path(tmp_path)
    first = results.preference_record("req 1", "sft", "baseline", "a")
    results.append_preference(tmp_path, first)
    with open(path, "ab") as f:
        f.write(TORN)  # a crash mid-append: no newline
    before = path.read_bytes()
    pick = results.preference_record("req 2", "sft", "baseline", "b")
    results.append_preference(tmp_path, pick)
    assert results.read_preferences(tmp_path) == [first, pick]
    assert results.remove_preference(tmp_path, pick)
    assert path.read_bytes() == before  # the torn line did not gain a "\n"
    # a pick undone from the middle, or after a good line, still keeps every other byte
    results.append_preference(tmp_path, pick)
    results.append_preference(tmp_path, first)
    mid = path.read_bytes()
    assert results.remove_preference(tmp_path, first)
    assert path.read_bytes() == mid[: -len(json.dumps(first, ensure_ascii=False)) - 1]


def test_the_skipped_lines_are_named(tmp_path: Path):
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copyfile(CORPUS / "torn_then_pick.jsonl", results.preferences_path(folder))
    with open(results.preferences_path(folder), "ab") as f:
        f.write(TORN)
    said = results.preference_problems(folder)
    assert [s.split(": ")[1] for s in said] == ["line 1", "line 2"], said
    assert said[1].startswith("results/human_preferences.jsonl: line 2: torn last line")
    assert all(s.endswith("skipped (the line stays in the file)") for s in said)


def test_the_compare_tab_names_them(ws: Workspace):
    from tui.compare import load_outputs

    ws.results_dir.mkdir(exist_ok=True)
    results.append_preference(ws.results_dir, results.preference_record("r", "sft", "ditto", "a"))
    with open(results.preferences_path(ws.results_dir), "ab") as f:
        f.write(TORN)
    problems: list[str] = []
    load_outputs(ws, problems)
    assert problems == [
        "results/human_preferences.jsonl: line 2: torn last line (a write was cut off: "
        "Unterminated string starting at): skipped (the line stays in the file)"
    ]


def test_reward_model_validation_names_them(tmp_path: Path):
    from engine.stages.reward_model import RmValidation

    summary = {"human": {"count": 0, "skipped": ["results/human_preferences.jsonl: line 2: x"]}}
    assert RmValidation([], summary).lines()[-1] == "results/human_preferences.jsonl: line 2: x"


@needs_backend
async def test_evaluate_names_a_torn_pick(ws: Workspace):
    """Fewer methods than the evaluation it replaces are named
    before any work and in the summary."""
    ws.results_dir.mkdir(exist_ok=True)
    wider = ["baseline", "prompting", "few-shot", "sft", "rlaif"]
    results.write_evaluation(ws.results_dir, {"methods": [{"name": m} for m in wider]})
    held = None
    from engine.store.settings import DataConfig
    from engine.store.split import workspace_split

    held = workspace_split(ws, DataConfig()).holdout[0]["input"]
    results.append_preference(
        ws.results_dir, results.preference_record(held, "baseline", "few-shot", "a")
    )
    with open(results.preferences_path(ws.results_dir), "ab") as f:
        f.write(TORN)
    quick = [
        "evaluate.samples=1",
        "evaluate.max_tokens=4",
        "evaluate.dev_prompts=0",
        "evaluate.judge=false",
        "evaluate.embedding=false",
    ]
    events = [e async for e in Runner(ws).run_stage("evaluate", quick)]
    assert isinstance(events[-1], StageFinished), events[-1]
    warned = [e.message for e in events if isinstance(e, LogLine) and e.level == "warning"]
    assert any(
        w.startswith("results/human_preferences.jsonl: line 2: torn last line") for w in warned
    ), warned
    narrower = [w for w in warned if w.startswith("the last evaluation also measured sft, rlaif")]
    assert len(narrower) == 1 and events.index(
        next(e for e in events if getattr(e, "message", "") == narrower[0])
    ) < next(i for i, e in enumerate(events) if type(e).__name__ == "SampleProduced")
    assert events[-1].summary.endswith("not evaluated this time: sft, rlaif")


def _finished_run(ws: Workspace) -> Path:
    run = ws.runs_dir / "baseline-20250101-120000"
    run.mkdir(parents=True)
    events = [
        StageStarted("baseline", str(run)),
        Metric("train/loss", 1, 0.5),
        StageFinished("baseline", summary="10 outputs"),
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(event_to_dict(e)) + "\n" for e in events))
    return run


def test_a_truncated_log_replays_with_a_note_about_the_cut(ws: Workspace):
    run = _finished_run(ws)
    assert {s.name: s for s in stage_status(ws)}["baseline"].state == "done"
    data = (run / "events.jsonl").read_bytes()
    (run / "events.jsonl").write_bytes(data[: data.rindex(b"\n", 0, -1) + 20])  # cut the end
    events = load_run_events(run)
    assert [type(e).__name__ for e in events] == ["StageStarted", "Metric", "LogLine"]
    assert events[-1].level == "warning"
    assert events[-1].message.startswith("baseline-20250101-120000/events.jsonl: line 3 is cut off")
    st = {s.name: s for s in stage_status(ws)}["baseline"]
    assert st.state == "interrupted" and "killed" not in st.message
    assert "events.jsonl is missing (cut short" in st.message
    assert list_runs(ws, "baseline") == [run]
