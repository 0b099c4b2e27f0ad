"""engine.pipeline.estimate: a stage's time from the speed profile, checked with a hand-made profile."""

from __future__ import annotations

import pytest
from conftest import TINY, hand_profile, needs_backend
from tui_helpers import write_method_outputs, write_synthetic

from engine.pipeline.estimate import (
    Estimate,
    EstimateError,
    TokenCounter,
    estimate_stage,
    human_seconds,
)
from engine.stages import STAGES as STAGE_REGISTRY
from engine.store.workspace import Workspace

pytestmark = needs_backend

STAGES = tuple(STAGE_REGISTRY)  # every registered stage, in order


def profile(**kw):
    from engine.backends.local.speed_profile import ProfileKey

    key = ProfileKey("Test CPU", ("avx2",), "cpu", "bfloat16", 2, "2.13.0", TINY)
    return hand_profile(key, **kw)


def est(ws: Workspace, stage: str, *overrides: str, p=None) -> Estimate:
    result = estimate_stage(stage, ws.config(list(overrides)), ws, p or profile())
    assert result is not None
    return result


def test_doubling_max_tokens_doubles_the_sampling(ws: Workspace):
    # 17 tokens: the prefill's token and 16 steps; 33 tokens: 32 steps
    short = est(ws, "baseline", "sampling.max_tokens=17")
    long = est(ws, "baseline", "sampling.max_tokens=33")
    assert long.part("sampling") == pytest.approx(2 * short.part("sampling"))
    assert long.part("model load") == short.part("model load") == 2.0
    assert long.upper_bound and long.line().startswith("≤")


def test_sampling_runs_in_waves_of_the_concurrency(ws: Workspace):
    demos = ws.load_demos()
    assert len(demos) == 10
    # 10 requests, 4 in flight: waves of 4, 4 and 2 rows, 16 steps each
    e = est(ws, "baseline", "sampling.max_tokens=17", "sampling.concurrency=4")
    p = profile()
    expected = 16 * (2 * p.step_s(4, 0) + p.step_s(2, 0))
    assert e.part("sampling") == pytest.approx(expected)
    assert e.seconds == pytest.approx(expected + 2.0)
    assert "10 requests × 1 answer × ≤17 tokens" in e.assumptions


def test_join_and_context_costs_are_added(ws: Workspace):
    plain = est(ws, "baseline", "sampling.max_tokens=9")
    joined = est(ws, "baseline", "sampling.max_tokens=9", p=profile(request_s=0.5))
    assert joined.part("sampling") == pytest.approx(plain.part("sampling") + 10 * 0.5)
    longer = est(ws, "baseline", "sampling.max_tokens=9", p=profile(context_s_per_token=1e-3))
    assert longer.part("sampling") > plain.part("sampling")


def test_training_scales_with_steps(ws: Workspace):
    write_synthetic(ws, 12)
    four = est(ws, "sft", "sft.steps=4", "sft.sample_after=false")
    eight = est(ws, "sft", "sft.steps=8", "sft.sample_after=false")
    assert eight.part("training") == pytest.approx(2 * four.part("training"))
    assert four.part("training") > 4 * 0.5  # tokens / rate plus one optimizer step a step
    assert four.part("sampling") == 0 and not four.upper_bound
    assert "≈" in four.line()
    with_samples = est(ws, "sft", "sft.steps=4")
    assert with_samples.part("sampling") > 0 and with_samples.line().startswith("≤")


def test_slower_training_rate_costs_proportionally_more(ws: Workspace):
    write_synthetic(ws, 12)
    base = est(ws, "sft", "sft.steps=4", "sft.sample_after=false")
    slow = est(
        ws, "sft", "sft.steps=4", "sft.sample_after=false", p=profile(train_tokens_per_s=50.0)
    )
    tokens_part = base.part("training") - 4 * 0.5
    assert slow.part("training") == pytest.approx(2 * tokens_part + 4 * 0.5)


def test_an_input_not_there_yet_is_estimated_from_the_config(ws: Workspace):
    e = est(ws, "synth-outputs")
    assert any("not written yet" in a for a in e.assumptions)
    cfg = ws.config()
    seeds = cfg.synth_inputs.max_seeds
    assert any(f"{seeds * cfg.synth_inputs.per_seed} requests" in a for a in e.assumptions)
    s = est(ws, "sft")
    assert any("not written yet" in a for a in s.assumptions)


def test_the_tinker_backend_has_no_estimate(ws: Workspace):
    cfg = ws.config(["backend.name=tinker"])
    for stage in STAGES:
        assert estimate_stage(stage, cfg, ws, profile()) is None


def test_every_stage_is_estimated_or_says_why(ws: Workspace):
    write_method_outputs(ws, ("baseline", "prompting", "sft"))
    write_synthetic(ws, 8)
    for stage in STAGES:
        try:
            e = est(ws, stage)
        except EstimateError as err:
            assert str(err)
            continue
        assert e.seconds >= 0
        assert e.line()
    with pytest.raises(EstimateError, match="held out"):
        est(ws, "evaluate", "data.holdout=0")


def test_judging_counts_both_orders_and_both_verdicts(ws: Workspace):
    write_method_outputs(ws, ("baseline", "prompting", "sft"))
    e = est(ws, "reward-model", "reward_model.validate_only=true")
    assert e.part("training") == 0
    # 10 requests, both orders, two forced-choice scorings: 40 judge prompts
    n = e.part("validation") * 1000.0 / 40
    assert 200 < n < 5000  # tokens of one judge prompt (+ verdict)
    slow = est(
        ws, "reward-model", "reward_model.validate_only=true", p=profile(prefill_tokens_per_s=500)
    )
    assert slow.part("validation") == pytest.approx(2 * e.part("validation"))


def test_the_line_names_the_machine_and_the_largest_parts(ws: Workspace):
    e = est(ws, "baseline")
    line = e.line()
    assert "on this machine (bf16, 2 threads)" in line
    assert "sampling" in line
    assert est(ws, "demos").line().startswith("no model")


def test_token_counter_falls_back_to_characters():
    rough = TokenCounter()
    assert rough.text("x" * 40) == 10
    assert rough.prompt([{"role": "user", "content": "x" * 40}]) > 10
    assert not rough.exact


def test_human_seconds():
    assert human_seconds(0.2) == "<1 s"
    assert human_seconds(42) == "42 s"
    assert human_seconds(126) == "2.1 min"
    assert human_seconds(60 * 25) == "25 min"
    assert human_seconds(3600 * 2) == "2.0 h"


def test_reward_model_counts_the_judge_accuracy_check(ws: Workspace):
    """Two held-out requests x (base + few-shot) x the samples per comparator, judged by the
    base and the trained judge; the samples are drawn once, then kept."""
    from engine.llm.judge_accuracy import ACCURACY_SAMPLES
    from engine.store.results import JUDGE_ACCURACY_FILE

    write_method_outputs(ws, ("baseline", "prompting", "sft"))
    e = est(ws, "reward-model")
    assert e.part("judge accuracy") > 0
    want = f"judge accuracy: 2 × {2 * 2 * ACCURACY_SAMPLES} comparisons on held-out requests"
    assert want in e.assumptions
    ws.result(JUDGE_ACCURACY_FILE).write_text("{}")
    kept = est(ws, "reward-model")
    assert kept.part("judge accuracy") < e.part("judge accuracy")  # no sampling any more


def test_evaluate_counts_its_judge_accuracy_check(ws: Workspace):
    """evaluate judges your held-out text against every base and few-shot sample of it."""
    from engine.store.split import workspace_split

    config = ws.config([])
    held = len(workspace_split(ws, config.data, record=False).holdout)
    assert held
    both = est(ws, "evaluate")
    want = 2 * held * config.evaluate.samples  # baseline and few-shot
    assert both.part("judge accuracy") > 0
    assert f"judge accuracy: {want} comparisons with your held-out text" in both.assumptions
    base_only = est(ws, "evaluate", 'evaluate.methods=["baseline", "prompting"]')
    assert base_only.part("judge accuracy") == pytest.approx(both.part("judge accuracy") / 2)
    assert est(ws, "evaluate", "evaluate.judge=false").part("judge accuracy") == 0
