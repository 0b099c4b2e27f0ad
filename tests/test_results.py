"""engine.store.results: names, round trips, the merge rules of the synthetic file's two writers."""

from __future__ import annotations

import json
from pathlib import Path

from engine.store import results


def _row(i: int, status: str = "pending", out: str = "x") -> dict:
    return {
        "id": f"in-{i}",
        "status": status,
        "messages": [
            {"role": "user", "content": f"req {i}"},
            {"role": "assistant", "content": out},
        ],
    }


def test_names_have_one_owner():
    from engine.store.workspace import RESULT_FILES

    assert RESULT_FILES is results.RESULT_FILES
    assert results.PREFERENCES_FILE == "human_preferences.jsonl"
    assert results.CHECKPOINTS_FILE == "checkpoints.toml"
    assert set(results.METHOD_FILES) == {"baseline", "prompting", "sft", "rlaif", "ditto"}


def test_method_outputs_round_trip(tmp_path: Path):
    path = tmp_path / "baseline_results.json"
    rows = [{"input": "a", "expected_output": "b", "output": "c"}]
    results.write_method_outputs(path, rows)
    assert results.read_method_outputs(path).rows == rows
    assert results.read_method_outputs(tmp_path / "missing.json").rows == []


def test_strict_read_names_file_and_line(tmp_path: Path):
    path = tmp_path / "results" / "synthetic_personalized_data.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(_row(1)) + "\n[1]\n")
    try:
        results.read_synthetic_rows(path).strict()
    except results.ResultsError as e:
        assert str(e).startswith("results/synthetic_personalized_data.jsonl: line 2: ")
    else:
        raise AssertionError("no error")


def test_stage_write_keeps_rows_changed_on_disk_since_it_started(tmp_path: Path):
    path = tmp_path / "synthetic_personalized_data.jsonl"
    results.atomic_write_jsonl(path, [_row(1), _row(2)])
    start = results.snapshot_synthetic_rows(path)
    results.save_review(path, [_row(2, "accepted"), _row(9, "rejected")])  # meanwhile
    report = results.write_synthetic_rows(
        path, [_row(1, out="new"), _row(2, out="new")], started_from=start
    )
    rows = results.read_synthetic_rows(path).rows
    assert rows == [_row(1, out="new"), _row(2, "accepted"), _row(9, "rejected")]
    assert report.merged_from_disk == 2
    # without a snapshot the rows are written as given
    results.write_synthetic_rows(path, [_row(3)])
    assert results.read_synthetic_rows(path).rows == [_row(3)]


def test_preferences_functions_moved_from_the_tui(tmp_path: Path):
    rec = results.preference_record("req", "sft", "baseline", "tie")
    assert rec["winner"] == rec["loser"] == "tie"
    results.append_preference(tmp_path, rec)
    assert results.read_preferences(tmp_path) == [rec]


def test_registry_is_reexported(tmp_path: Path):
    results.record_checkpoint(tmp_path, "sft", step=3, finished=False)
    assert results.latest_checkpoint(tmp_path, "sft")["step"] == 3
    assert results.registry_path(tmp_path).name == "checkpoints.toml"
