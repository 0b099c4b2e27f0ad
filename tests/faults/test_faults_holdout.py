"""A hand-edited data/holdout.json entry that matches no demonstration (a typo)
was rewritten to "holdout": [] and ditto trained on every demonstration, the two held-out
ones included. It is an error naming the entry, in preflight; the record is never rewritten."""

from __future__ import annotations

import json

import pytest

from engine.pipeline.runner import Runner, list_runs
from engine.store.settings import DataConfig
from engine.store.split import HoldoutError, workspace_split
from engine.store.workspace import Workspace


def _hand_edit(ws: Workspace, typo: bool = True) -> tuple[list[str], bytes]:
    first = workspace_split(ws, DataConfig())  # recorded: two held out of ten
    held = [d["input"] for d in first.holdout]
    assert len(held) == 2
    path = ws.data_dir / "holdout.json"
    edited = [
        held[0],
        held[1].replace(held[1][:12], held[1][:12].upper() + "x") if typo else held[1],
    ]
    path.write_text(json.dumps({"holdout": edited, "manual": True}))
    return held, path.read_bytes()


@pytest.mark.parametrize("manual", [True, False])
def test_an_entry_matching_nothing_is_an_error_naming_it(ws: Workspace, manual: bool):
    held, _ = _hand_edit(ws)
    path = ws.data_dir / "holdout.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "manual": manual}))
    before = path.read_bytes()
    with pytest.raises(HoldoutError) as e:
        workspace_split(ws, DataConfig())
    msg = str(e.value)
    assert (
        msg.startswith("data/holdout.json: held-out request ") and "matches no demonstration" in msg
    )
    assert rec["holdout"][1][:30] in msg and held[0][:30] not in msg  # names the one that fails
    assert path.read_bytes() == before  # never rewritten to a smaller set


@pytest.mark.parametrize("stage", ["ditto", "sft", "evaluate", "rlaif", "reward-model"])
async def test_stages_refuse_in_preflight_without_a_run_folder(ws: Workspace, stage: str):
    _, before = _hand_edit(ws)
    for name in (
        "synthetic_personalized_data.jsonl",
        "rl_train_data.jsonl",
        "baseline_results.json",
    ):
        ws.result(name).parent.mkdir(parents=True, exist_ok=True)
        ws.result(name).write_text("{}\n")
    final = await Runner(ws).run(stage)
    assert final.message.startswith("data/holdout.json: held-out request "), final
    assert list_runs(ws) == [] and (ws.data_dir / "holdout.json").read_bytes() == before


def test_a_correct_hand_edit_still_holds_out_what_it_names(ws: Workspace):
    held, _ = _hand_edit(ws, typo=False)
    split = workspace_split(ws, DataConfig())
    assert sorted(d["input"] for d in split.holdout) == sorted(held)
