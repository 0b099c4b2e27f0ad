"""reward-model: own pairs from training demos only, LoRA SFT of the judge on the tiny model,
validation file and summary, reuse of a finished training, Preference-Collection loading."""

from __future__ import annotations

import json

import pytest
from conftest import needs_backend

from engine.llm.judge import PREFER_A, PREFER_B, RuleJudge
from engine.llm.preference_data import load_preference_collection
from engine.pipeline.runner import Runner, list_runs, load_run_events
from engine.run.events import Metric, StageFinished
from engine.stages.reward_model import build_own_pairs
from engine.store.checkpoints import latest_checkpoint
from engine.store.config import load_config
from engine.store.results import append_preference, preference_record, read_rm_validation
from engine.store.split import workspace_split
from engine.store.workspace import Workspace

RM_TOML = """
[reward_model]
batch_size = 4
steps = 3
rank = 4
checkpoint_every = 2
max_length = 512
concurrency = 8
"""


def _write_outputs(ws: Workspace, name: str, tag: str) -> None:
    rows = [
        {"input": d["input"], "expected_output": d["output"], "output": f"{tag} reply {i}"}
        for i, d in enumerate(ws.load_demos())
    ]
    ws.result(name).parent.mkdir(parents=True, exist_ok=True)
    ws.result(name).write_text(json.dumps(rows))


def test_own_pairs_use_training_demos_only(ws: Workspace):
    split = workspace_split(ws, load_config(ws.config_path).data)
    assert split.holdout, "the example workspace holds some demonstrations out"
    demos = ws.load_demos()
    rows = {
        src: [{"input": d["input"], "output": f"{src} {i}"} for i, d in enumerate(demos)]
        for src in ("baseline", "prompting")
    }
    pairs = build_own_pairs(split.train, rows, "the rubric")
    assert len(pairs) == 4 * len(split.train)  # 2 sources x 2 orders
    held = {d["input"] for d in split.holdout}
    held_texts = {d["output"] for d in split.holdout}
    for e in pairs:
        c = e.comparison
        assert c.prompt_conversation[0]["content"] not in held
        assert not {c.completion_a, c.completion_b} & held_texts
        mine = c.completion_a if e.preference == PREFER_A else c.completion_b
        assert mine in {d["output"] for d in split.train}
        assert c.rubric == "the rubric"
    assert {e.preference for e in pairs} == {PREFER_A, PREFER_B}


def test_preference_collection_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "orig_instruction": f"Write a haiku about {i}",
            "orig_response_A": f"a{i}",
            "orig_response_B": f"b{i}",
            "orig_criteria": "Is it a haiku?",
            "orig_reference_answer": "ref",
            "orig_preference": "A" if i % 2 else "B",
            "orig_feedback": f"feedback {i}",
            "instruction": "...",
            "output": f"feedback {i} [RESULT] {'A' if i % 2 else 'B'}",
        }
        for i in range(20)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pc.parquet")
    (tmp_path / "pc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("pc.parquet", "pc.jsonl"):
        train, held = load_preference_collection(tmp_path / name, max_examples=5, heldout=4)
        assert [e.comparison.completion_a for e in held] == ["a0", "a1", "a2", "a3"]
        assert len(train) == 5 and all(int(e.comparison.completion_a[1:]) >= 4 for e in train)
        assert held[1].preference == PREFER_A and held[0].preference == PREFER_B
        assert held[0].feedback == "feedback 0" and held[0].comparison.reference == "ref"


@needs_backend
async def test_reward_model_trains_validates_and_reuses(ws: Workspace):
    ws.config_path.write_text(ws.config_path.read_text() + RM_TOML)
    _write_outputs(ws, "baseline_results.json", "baseline")
    _write_outputs(ws, "prompt_engineering_results.json", "prompted")
    _write_outputs(ws, "sft_model_outputs.json", "sft")
    short = ["sampling.max_tokens=12"]  # the accuracy samples: the tiny model never stops
    first = ws.load_demos()[0]["input"]
    append_preference(ws.results_dir, preference_record(first, "sft", "baseline", "a"))

    final = await Runner(ws).run("reward-model", short)
    assert isinstance(final, StageFinished), final
    entry = latest_checkpoint(ws.results_dir, "reward-model")
    assert entry["finished"] and entry["step"] == 3 and entry["mode"] == "verdict"
    (run,) = list_runs(ws, "reward-model")
    names = {e.name for e in load_run_events(run) if isinstance(e, Metric)}
    assert {"train/loss", "rm/heldout_accuracy", "rm/unparsable_rate"} <= names
    records, summary = read_rm_validation(ws.result("rm_validation.json"))
    assert len(records) == len(ws.load_demos())
    for r in records:
        assert {"input", "baseline_output", "sft_output", "preference", "grader_response"} <= set(r)
        assert r["preference"] in (-1, 0, 1)
    assert summary["baseline_wins"] + summary["sft_wins"] + summary["ties"] == len(records)
    assert summary["human"]["count"] == 1
    assert records[0]["human_pick"] == PREFER_B  # the person picked the SFT output
    # every record keeps both orders' margins, the calibrated preference and the bias
    for r in records:
        assert r["combined_by"] == "calibrated"
        assert r["s"] == pytest.approx((r["m_ab"] - r["m_ba"]) / 2)
        assert r["b"] == pytest.approx((r["m_ab"] + r["m_ba"]) / 2)
    assert 0.0 <= summary["decided_share"] <= 1.0 and summary["mean_position_bias"] is not None
    # the judge's accuracy on held-out demonstrations, for the base and the trained judge:
    # 2 held-out requests x 4 samples against the base and against few-shot; the pairs it
    # trained on (3 stages' samples on the 6 training demonstrations whose pairs are not
    # kept aside for the live metric) as "seen in training"
    acc = summary["accuracy"]
    assert acc["n_heldout_requests"] == 2
    for judge in ("base", "trained"):
        assert acc[judge]["vs_base"]["n"] == 8 and acc[judge]["vs_few_shot"]["n"] == 8
        assert acc[judge]["seen_in_training"]["n"] == 18
        for cell in (acc[judge][k] for k in ("vs_base", "vs_few_shot", "seen_in_training")):
            low, high = cell["ci"]
            assert low <= cell["value"] <= high
    cached = json.loads(ws.result("judge_accuracy_samples.json").read_text())
    held = {d["input"] for d in workspace_split(ws, load_config(ws.config_path).data).holdout}
    assert {r["input"] for r in cached["rows"]} == held  # only held-out requests
    # the random tiny judge cannot tell anything apart: said in plain words
    assert any("cannot tell your writing" in w for w in summary["warnings"])
    assert "do not trust this judge" in final.summary

    # a rerun (e.g. after a kill during validation) reuses the finished training
    final2 = await Runner(ws).run("reward-model", [*short, "reward_model.validate=false"])
    assert isinstance(final2, StageFinished), final2
    assert (
        latest_checkpoint(ws.results_dir, "reward-model")["sampler_path"] == entry["sampler_path"]
    )
    run2 = [r for r in list_runs(ws, "reward-model") if r != run][0]
    assert not [
        e for e in load_run_events(run2) if isinstance(e, Metric) and e.name == "train/loss"
    ]


@needs_backend
async def test_validation_with_rule_judge_and_no_picks(ws: Workspace):
    from engine.run.context import StageContext
    from engine.stages.reward_model import validate_rubric

    _write_outputs(ws, "baseline_results.json", "a much longer baseline")
    _write_outputs(ws, "sft_model_outputs.json", "sft")
    ctx = StageContext(ws, load_config(ws.config_path), "reward-model", ws.root / "runs" / "x")
    v = await validate_rubric(ctx, rubric="shorter is better", judge=RuleJudge(), write=False)
    assert v.summary["sft_wins"] == len(ws.load_demos()) and v.summary["baseline_wins"] == 0
    assert v.summary["position_consistency"] == pytest.approx(1.0)
    assert v.summary["human"]["count"] == 0 and "Compare tab" in v.summary["human"]["note"]
    assert not ws.result("rm_validation.json").exists()


def _ctx(ws: Workspace):
    from engine.run.context import StageContext

    return StageContext(ws, load_config(ws.config_path), "reward-model", ws.root / "runs" / "x")


async def test_train_false_makes_later_stages_use_the_base_judge(ws: Workspace):
    """A trained judge is recorded; a reward-model run with train = false marks the entry
    use_base, so open_judge (rlaif, evaluate) takes the base judge; training again clears it."""
    from engine.stages.reward_model import trained_judge_entry
    from engine.store.checkpoints import record_checkpoint

    ctx = _ctx(ws)
    trained = dict(
        sampler_path="/somewhere/final", finished=True, step=3, base_model=ctx.model("judge"),
        backend=ctx.backend, mode="verdict", fingerprint="f",
    )  # fmt: skip
    record_checkpoint(ws.results_dir, "reward-model", **trained)
    assert trained_judge_entry(ctx)["sampler_path"] == "/somewhere/final"

    final = await Runner(ws).run(
        "reward-model", ["reward_model.train=false", "reward_model.validate=false"]
    )
    assert isinstance(final, StageFinished), final
    entry = latest_checkpoint(ws.results_dir, "reward-model")
    assert entry["use_base"] is True
    assert {k: entry[k] for k in trained} == trained  # the other fields stay
    assert trained_judge_entry(ctx) is None

    # a trained run (here: the reuse of a finished training) clears it
    record_checkpoint(ws.results_dir, "reward-model", use_base=False)
    assert trained_judge_entry(ctx)["sampler_path"] == "/somewhere/final"


async def test_validate_only_checks_the_files_before_loading_the_judge(ws: Workspace, monkeypatch):
    from engine.run.events import StageFailed
    from engine.stages import reward_model

    async def no_judge(*a, **k):
        raise AssertionError("the judge was opened before the outputs were checked")

    monkeypatch.setattr(reward_model, "open_judge", no_judge)
    _write_outputs(ws, "baseline_results.json", "baseline")  # no SFT outputs
    final = await Runner(ws).run("reward-model", ["reward_model.validate_only=true"])
    assert isinstance(final, StageFailed), final
    assert "sft_model_outputs.json" in final.message and "run `persona run sft`" in final.message
    ws.result("sft_model_outputs.json").write_text("{not json")
    final = await Runner(ws).run("reward-model", ["reward_model.validate_only=true"])
    assert isinstance(final, StageFailed) and "sft_model_outputs.json" in final.message, final


@needs_backend
async def test_comparisons_longer_than_max_length_are_left_out_not_cut(ws: Workspace):
    """A cut comparison loses its verdict (the target is at the end): it is left out with a
    warning, and the loss stays a number."""
    _write_outputs(ws, "baseline_results.json", "base")
    _write_outputs(ws, "prompt_engineering_results.json", "p")
    args = [
        "reward_model.steps=2",
        "reward_model.batch_size=2",
        "reward_model.rank=4",
        "reward_model.validate=false",
        "reward_model.max_length=400",
    ]
    events = [e async for e in Runner(ws).run_stage("reward-model", args)]
    final = events[-1]
    warned = [
        e for e in events if getattr(e, "level", "") == "warning" and "max_length" in e.message
    ]
    if isinstance(final, StageFinished):
        assert warned, "some comparisons must have been too long at 400 tokens"
        losses = [e.value for e in events if isinstance(e, Metric) and e.name == "train/loss"]
        assert losses and all(v == v for v in losses)  # no NaN
    else:  # every comparison was too long: a clear message, not a NaN run
        assert "reward_model.max_length" in final.message
