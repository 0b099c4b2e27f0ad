"""A finished training is reused (the rerun only samples); rows cut by
sft.max_length are counted and reported; sft.too_long = "drop" leaves them out."""

from __future__ import annotations

import json

from conftest import needs_backend

from engine.pipeline.runner import Runner
from engine.run.events import LogLine, Metric, StageFailed, StageFinished
from engine.store import results
from engine.store.workspace import Workspace

pytestmark = needs_backend

ROWS = [
    ("Email Sam about the racks due Fri 5/2.", "Hi Sam —\n\nTwo racks by Fri 5/2?\n\nThanks!"),
    ("Ask Prof. Kim for a letter by 10/15.", "Hi Prof. Kim —\n\nMy NSF letter?\n\nThanks!"),
    ("Tell Lena the hood in 310 beeps.", "Hi Lena —\n\nThe hood in 310 beeps.\n\nThanks!"),
    ("Ask Dr. Patel about my 3/12 bill.", "Hi Dr. Patel —\n\nWas 3/12 billed?\n\nThanks!"),
]
LONG = ("Write Maya's long field report.", "Hi all —\n\n" + "The samples look fine. " * 120)
ARGS = [
    "sft.lr=0.01",
    "sft.eval_every=1000",
    "sft.batch_size=2",
    "sft.val_fraction=0",
    "sft.steps=2",
]


def write_data(ws: Workspace, rows=ROWS) -> None:
    results.atomic_write_jsonl(
        ws.result("synthetic_personalized_data.jsonl"),
        [
            {
                "id": f"in-{i}",
                "status": "accepted",
                "messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}],
            }
            for i, (a, b) in enumerate(rows)
        ],
    )


def _trained(events) -> bool:
    return any(isinstance(e, Metric) and e.name == "train/loss" for e in events)


async def test_rerun_after_a_finished_training_only_samples(ws: Workspace):
    """The state a kill -9 during the final sampling leaves behind is a finished registry
    entry and no outputs file (the outputs are written atomically at the end). The rerun must
    reuse the training and only sample; changed training settings train again."""
    write_data(ws)
    first = [e async for e in Runner(ws).run_stage("sft", [*ARGS, "sft.sample_after=false"])]
    assert isinstance(first[-1], StageFinished) and _trained(first)
    entry = results.latest_checkpoint(ws.results_dir, "sft")
    assert entry["finished"] is True and not ws.result("sft_model_outputs.json").exists()

    rerun = [e async for e in Runner(ws).run_stage("sft", [*ARGS, "sft.sample_after=true"])]
    assert isinstance(rerun[-1], StageFinished), rerun[-1]
    assert not _trained(rerun)  # no step was trained again
    assert any(isinstance(e, LogLine) and "reusing it" in e.message for e in rerun)
    assert results.latest_checkpoint(ws.results_dir, "sft")["sampler_path"] == entry["sampler_path"]
    outputs = results.read_method_outputs(ws.result("sft_model_outputs.json"))
    assert not outputs.problems and len(outputs.rows) == len(ws.load_demos())

    changed = [e async for e in Runner(ws).run_stage("sft", [*ARGS, "sft.lr=0.02"])]
    assert isinstance(changed[-1], StageFinished) and _trained(changed)
    forced = [
        e async for e in Runner(ws).run_stage("sft", [*ARGS, "sft.lr=0.02", "sft.resume=false"])
    ]
    assert isinstance(forced[-1], StageFinished) and _trained(forced)


async def test_rows_cut_by_max_length_are_counted_and_can_be_dropped(ws: Workspace):
    """A row longer than sft.max_length is reported (count, longest, tokens lost) in the
    log and the summary; with sft.too_long = "drop" it is left out of training."""
    write_data(ws, [*ROWS, LONG])
    base = [*ARGS, "sft.sample_after=false", "sft.max_length=128", "sft.resume=false"]
    cut = [e async for e in Runner(ws).run_stage("sft", base)]
    assert isinstance(cut[-1], StageFinished), cut[-1]
    warn = [e.message for e in cut if isinstance(e, LogLine) and "sft.max_length=128" in e.message]
    assert warn and warn[0].startswith("1 of 5 rows longer") and "cut" in warn[0], warn
    assert 'sft.too_long = "drop"' in warn[0]
    assert "1 of 5 rows longer than sft.max_length=128 tokens cut" in cut[-1].summary

    drop = [e async for e in Runner(ws).run_stage("sft", [*base, 'sft.too_long="drop"'])]
    assert isinstance(drop[-1], StageFinished), drop[-1]
    assert "left out" in drop[-1].summary and "on 4 rows" in drop[-1].summary

    write_data(ws, [LONG])
    (all_long,) = [
        e
        async for e in Runner(ws).run_stage("sft", [*base, 'sft.too_long="drop"'])
        if isinstance(e, StageFailed)
    ]
    assert "every training row is longer than sft.max_length=128" in all_long.message


def test_rows_file_with_bad_lines_trains_on_the_good_ones_and_names_the_rest(ws: Workspace):
    """A JSON list row, a status that is a list and messages that are not
    a list are skipped with a line-numbered warning instead of an AttributeError."""
    path = ws.result("synthetic_personalized_data.jsonl")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(
        b'["a list"]\n{"status": ["accepted"], "messages": []}\n{"messages": "x"}\n\xff\n'
    )
    loaded = results.read_synthetic_rows(path)
    assert loaded.rows == [] and [b.line for b in loaded.bad] == [1, 2, 3, 4]
    assert json.dumps(loaded.problems)  # plain strings, each naming the file and line
    assert all(
        p.startswith("results/synthetic_personalized_data.jsonl: line ") for p in loaded.problems
    )
