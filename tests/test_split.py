"""The held-out split: deterministic, stable under edits, recorded, and kept from training."""

from __future__ import annotations

import json

import pytest

from engine.store.settings import DataConfig
from engine.store.split import (
    HoldoutError,
    Record,
    holdout_count,
    read_record,
    set_holdout,
    split_demos,
    workspace_split,
)
from engine.store.workspace import Workspace


def demos(n: int) -> list[dict[str, str]]:
    return [{"input": f"Request number {i}", "output": f"Text {i}"} for i in range(n)]


def test_counts():
    assert [holdout_count(-1, n) for n in (3, 4, 5, 7, 8, 12)] == [0, 0, 1, 1, 2, 2]
    assert holdout_count(3, 10) == 3 and holdout_count(9, 10) == 7  # 3 stay for training


def test_deterministic_and_seeded():
    a = split_demos(demos(10), -1, 0, None)
    b = split_demos(list(reversed(demos(10))), -1, 0, None)
    assert len(a.holdout) == 2 and {d["input"] for d in a.holdout} == {
        d["input"] for d in b.holdout
    }
    assert not {d["input"] for d in a.train} & {d["input"] for d in a.holdout}
    assert len(a.train) == 8
    others = {
        tuple(d["input"] for d in split_demos(demos(10), -1, s, None).holdout) for s in range(6)
    }
    assert len(others) > 1  # the seed matters


def test_stable_under_additions_and_edits():
    base = demos(10)
    first = split_demos(base, -1, 0, None)
    record = read_like(first)
    # add five new demos and edit the output of a held-out one: the held-out set stays
    more = [dict(d) for d in base] + [{"input": f"Another {i}", "output": "x"} for i in range(5)]
    for d in more:
        if d["input"] == first.holdout[0]["input"]:
            d["output"] = "edited text"
    again = split_demos(more, -1, 0, record)
    assert [d["input"] for d in again.holdout] == [d["input"] for d in first.holdout]
    # delete one held-out demo: an error names it; once it is taken out of the
    # record as well, the gap is filled by the rule and the other stays
    fewer = [d for d in base if d["input"] != first.holdout[0]["input"]]
    with pytest.raises(HoldoutError, match="Request number"):
        split_demos(fewer, -1, 0, record)
    filled = split_demos(fewer, -1, 0, Record(record.inputs[1:]))
    assert first.holdout[1] in filled.holdout and len(filled.holdout) == 2


def read_like(split):
    from engine.store.split import Record

    return Record([d["input"] for d in split.holdout])


def test_few_demos_warn():
    s = split_demos(demos(4), -1, 0, None)
    assert s.holdout == [] and "measured fairly" in s.warning


def test_recorded_in_workspace_and_manual_choice(ws: Workspace):
    cfg = DataConfig()
    first = workspace_split(ws, cfg)
    rec = json.loads((ws.data_dir / "holdout.json").read_text())
    assert rec["holdout"] == [d["input"] for d in first.holdout] and rec["manual"] is False
    all_demos = ws.load_demos()
    set_holdout(ws, [all_demos[0]["input"], all_demos[1]["input"], all_demos[2]["input"]])
    manual = workspace_split(ws, cfg)
    assert manual.holdout_index == frozenset({0, 1, 2}) and len(manual.train) == len(all_demos) - 3
    assert read_record(ws.data_dir).manual


def test_split_fingerprint_follows_the_held_out_requests_only():
    from engine.store.split import split_fingerprint

    a = split_demos(demos(10), -1, 0, None)
    b = split_demos(list(reversed(demos(10))), -1, 0, None)
    assert split_fingerprint(a) == split_fingerprint(b)  # order of data.json does not matter
    spaced = [{**d, "input": "  " + d["input"].upper() + " "} for d in demos(10)]
    assert split_fingerprint(split_demos(spaced, -1, 0, None)) == split_fingerprint(a)
    # the count grows (8 -> 2 held out) or a held-out request is edited: another fingerprint
    assert split_fingerprint(split_demos(demos(7), -1, 0, None)) != split_fingerprint(
        split_demos(demos(8), -1, 0, None)
    )
    edited = [
        {**d, "input": d["input"] + " (edited)"} if d in a.holdout[:1] else d for d in demos(10)
    ]
    assert split_fingerprint(split_demos(edited, -1, 0, None)) != split_fingerprint(a)


def test_follow_demo_edits_keeps_the_record_naming_the_same_demonstrations(tmp_path):
    """An edited held-out request stays held out under its new text; a deleted one leaves
    the record and the rule holds out another in its place; reorders and training edits
    change nothing; the record then matches the demonstrations (no stage stops on it)."""
    from engine.store.split import follow_demo_edits, write_record

    before = demos(10)
    first = split_demos(before, -1, 0, None)
    write_record(tmp_path, [d["input"] for d in first.holdout])
    held = sorted(first.holdout_index)
    train = next(i for i in range(10) if i not in held)
    # a reorder and an edit of a training demonstration: nothing written
    after = [dict(d) for d in reversed(before)]
    after[9 - train]["input"] += " (edited)"
    unchanged = (tmp_path / "holdout.json").read_text()
    update = follow_demo_edits(tmp_path, before, after, [9 - i for i in range(10)], -1, 0)
    assert not update.changed and update.message() == ""
    assert (tmp_path / "holdout.json").read_text() == unchanged
    # edit the first held-out request, delete the second
    after = [dict(d) for d in before if d is not before[held[1]]]
    moved_to = [None if i == held[1] else i - (i > held[1]) for i in range(10)]
    after[moved_to[held[0]]]["input"] = "A new request, rewritten"
    update = follow_demo_edits(tmp_path, before, after, moved_to, -1, 0)
    assert update.edited == [(moved_to[held[0]], before[held[0]]["input"])]
    assert update.deleted == [before[held[1]]["input"]] and len(update.filled) == 1
    now = split_demos(after, -1, 0, read_record(tmp_path))  # raised before: a stale record
    assert moved_to[held[0]] in now.holdout_index and len(now.holdout) == 2
    assert sorted(now.holdout_index) == update.held
    assert "A new request, rewritten" in read_record(tmp_path).inputs
    text = update.message()
    assert f"demonstration {moved_to[held[0]] + 1} edited, still held out" in text
    assert "deleted" in text and "train again from the start" in text
    assert f"{update.filled[0] + 1} new)" in text


def test_follow_demo_edits_by_hand_and_without_a_record(tmp_path):
    """A hand-chosen record loses a deleted demonstration without a replacement; with no
    record yet, editing a held-out request writes one so that it stays held out."""
    from engine.store.split import follow_demo_edits

    before = demos(10)
    held = sorted(split_demos(before, -1, 0, None).holdout_index)
    after = [dict(d) for d in before]
    after[held[0]]["input"] = "Rewritten request"
    update = follow_demo_edits(tmp_path, before, after, list(range(10)), -1, 0)
    assert update.held == held and read_record(tmp_path).inputs[0] == "Rewritten request"
    assert split_demos(after, -1, 0, read_record(tmp_path)).holdout_index == frozenset(held)
    set_holdout_dir(tmp_path, [before[0]["input"], before[1]["input"], before[2]["input"]])
    after = before[1:]
    update = follow_demo_edits(tmp_path, before, after, [None, *range(9)], -1, 0)
    assert update.deleted == [before[0]["input"]] and update.filled == []
    assert update.held == [0, 1] and read_record(tmp_path).manual
    # a record that already named a missing request is left for the person to fix
    set_holdout_dir(tmp_path, ["A request nobody wrote"])
    with pytest.raises(HoldoutError):
        follow_demo_edits(tmp_path, demos(5), demos(5), list(range(5)), -1, 0)
    assert read_record(tmp_path).inputs == ["A request nobody wrote"]


def set_holdout_dir(data_dir, inputs):
    from engine.store.split import write_record

    write_record(data_dir, inputs, manual=True)
