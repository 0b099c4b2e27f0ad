"""Stage 11 (evaluate): its aggregation on hand-made cases, and end to end on the tiny model
after sft (evaluation.json, the per-sample records, report.md and its plots)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import needs_backend

from engine.eval import evaluation as ev
from engine.eval.metrics.likelihood import Nll
from engine.pipeline.runner import Runner
from engine.run.events import LogLine, Metric, Progress, SampleProduced, StageFailed, StageFinished
from engine.stages.evaluate import JUDGE_CHUNK
from engine.store.config import load_config
from engine.store.results import append_preference, preference_record
from engine.store.split import workspace_split
from engine.store.workspace import Workspace

# --------------------------------------------------------------------------- aggregation


def test_mean_interval_by_hand():
    r = ev.mean_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(2) = 4.303: half-width 4.303 / sqrt(3) = 2.4843
    assert r["mean"] == 2.0 and r["n"] == 3 and r["sd"] == pytest.approx(1.0)
    assert r["low"] == pytest.approx(2 - 2.4843, abs=1e-3)
    assert r["high"] == pytest.approx(2 + 2.4843, abs=1e-3)
    one = ev.mean_interval([5.0, float("nan")])
    assert one["mean"] == 5.0 and one["n"] == 1 and one["low"] is None
    assert ev.mean_interval([])["mean"] is None


def test_nll_summary_pools_tokens():
    # request 1: 6 nats over 3 tokens (2.0), request 2: 2 nats over 1 token (2.0) -> 8 / 4
    s = ev.nll_summary([Nll(6.0, 3.0), Nll(1.0, 1.0)])
    assert s["mean"] == pytest.approx(7.0 / 4.0)
    assert s["per_request"] == [2.0, 1.0] and s["n"] == 2 and s["tokens"] == 4.0
    # t interval over per-request means 2 and 1: mean 1.5, sd 0.7071, t(1) 12.706
    half = 12.706 * math.sqrt(0.5) / math.sqrt(2)
    assert s["high"] == pytest.approx(1.5 + half, abs=1e-3)
    assert s["low"] == 0.0  # 1.5 - half is below zero: an NLL cannot be, so it is clipped


def test_judge_matrix_and_overall_by_hand():
    recs = [("a", "b", 1), ("a", "b", 1), ("b", "a", 0), ("a", "c", -1), ("b", "c", 1)]
    m = ev.judge_matrix(recs, ["a", "b", "c"])
    assert (m["a"]["b"]["wins"], m["a"]["b"]["losses"], m["a"]["b"]["ties"]) == (2, 0, 1)
    assert m["a"]["b"]["rate"] == pytest.approx(2.5 / 3)
    assert m["b"]["a"]["rate"] == pytest.approx(0.5 / 3)
    assert m["c"]["a"]["rate"] == 1.0 and m["c"]["a"]["n"] == 1
    overall = ev.overall_record(recs, "a")
    assert (overall.wins, overall.losses, overall.ties) == (2, 1, 1)
    wins = ev.judge_wins_per_sample(
        [{"a": "x/1", "b": "y/1", "preference": 1}, {"a": "y/1", "b": "x/1", "preference": 0}]
    )
    assert wins == {"x/1": [1, 0, 1], "y/1": [0, 1, 1]}


def test_human_summary_and_agreement_by_hand():
    picks = [
        {"input": "req 1", "a": "sft", "b": "baseline", "choice": "a"},
        {"input": "req 1", "a": "baseline", "b": "sft", "choice": "b"},
        {"input": "other", "a": "sft", "b": "baseline", "choice": "tie"},
        {
            "input": "other",
            "a": "sft",
            "b": "ditto",
            "choice": "a",
        },  # the judge never compared these
        {"input": "bad", "a": "sft", "choice": "a"},  # malformed: skipped
    ]
    judgements = [
        # on "req 1" the judge prefers sft (2 wins to 1 loss)
        {"method_a": "baseline", "method_b": "sft", "input": "req 1", "preference": -1},
        {"method_a": "baseline", "method_b": "sft", "input": "req 1", "preference": -1},
        {"method_a": "baseline", "method_b": "sft", "input": "req 1", "preference": 1},
    ]
    h = ev.human_summary(picks, judgements, ["baseline", "sft", "ditto"])
    assert h["n_picks"] == 4
    pairs = {(p["a"], p["b"]): p for p in h["pairs"]}
    bs = pairs[("baseline", "sft")]  # sorted key: baseline's record against sft
    assert (bs["wins"], bs["losses"], bs["ties"], bs["n"]) == (0, 2, 1, 3)
    assert h["per_method"]["sft"]["wins"] == 3 and h["per_method"]["sft"]["ties"] == 1
    ag = h["agreement"]
    # picks 1, 2 on req 1 (judge: sft) agree; pick 3 uses the pair verdict (sft) vs the tie: no
    assert (ag["agree"], ag["n"], ag["by_request"], ag["by_pair"]) == (2, 3, 2, 1)
    low, high = ev.wilson_interval(2, 3)
    assert (ag["low"], ag["high"]) == (low, high)


def test_reward_hacking_candidates_by_hand():
    samples = [
        {
            "id": "rlaif/r0/s0",
            "method": "rlaif",
            "input": "q",
            "output": "x " * 200,
            "length_words": 200,
            "style_distance": 0.5,
        },
        {
            "id": "rlaif/r1/s0",
            "method": "rlaif",
            "input": "p",
            "output": "fine",
            "length_words": 50,
            "style_distance": 0.5,
        },
        {
            "id": "rlaif/r2/s0",
            "method": "rlaif",
            "input": "r",
            "output": "long",
            "length_words": 300,
            "style_distance": 0.5,
        },
        {
            "id": "baseline/r0/s0",
            "method": "baseline",
            "input": "q",
            "output": "b",
            "length_words": 50,
            "style_distance": 3.0,
        },
    ]
    judgements = [
        {"a": "rlaif/r0/s0", "b": "baseline/r0/s0", "preference": 1},
        {"a": "rlaif/r1/s0", "b": "baseline/r1/s0", "preference": 1},
        {
            "a": "rlaif/r2/s0",
            "b": "baseline/r2/s0",
            "preference": -1,
        },  # the judge did not prefer it
    ]
    picks = [{"input": "p", "a": "rlaif", "b": "baseline", "choice": "b"}]
    out = ev.reward_hacking_candidates(samples, judgements, picks, (50.0, 5.0), ["rlaif"])
    assert [o["id"] for o in out] == ["rlaif/r0/s0", "rlaif/r1/s0"]
    assert "length 200" in out[0]["reasons"][0]  # (200 - 50) / max(5, 10) = 15 sd
    assert out[1]["reasons"] == ["the person picked against this method on this request"]


def test_training_cost_and_curves(tmp_path):
    run = tmp_path / "sft-1"
    run.mkdir()
    rows = [
        {"type": "StageStarted", "stage": "sft", "ts": 100.0},
        {"type": "Metric", "name": "train/loss", "step": 1, "value": 2.0, "ts": 101.0},
        {"type": "Metric", "name": "train/tokens", "step": 1, "value": 64, "ts": 101.0},
        {"type": "Metric", "name": "train/loss", "step": 2, "value": 1.5, "ts": 102.0},
        {"type": "StageFinished", "stage": "sft", "ts": 110.0},
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = ev.training_cost(run)
    assert (c["seconds"], c["steps"], c["tokens"]) == (10.0, 2, 64.0)
    assert ev.training_curves(run)["train/loss"] == [(1, 2.0), (2, 1.5)]
    assert ev.training_cost(tmp_path / "missing")["seconds"] is None


def test_summary_rows_mark_the_best():
    data = {
        "methods": [{"name": "baseline", "label": "base"}, {"name": "sft", "label": "SFT"}],
        "metrics": {
            "baseline": {"nll": {"mean": 3.0, "n": 2}, "judge_vs_all": {"rate": 0.25, "n": 4}},
            "sft": {"nll": {"mean": 2.0, "n": 2}, "judge_vs_all": {"rate": 0.75, "n": 4}},
        },
    }
    rows = {r["method"]: r for r in ev.summary_rows(data)}
    assert rows["sft"]["best"] == ["nll", "judge"] and rows["baseline"]["best"] == []
    assert rows["baseline"]["cells"]["similarity"]["value"] is None


# --------------------------------------------------------------------------- end to end

SYNTH = [
    (
        "Email Sam about the racks due Fri 5/2.",
        "Hi Sam —\n\nCan you order two racks by Fri 5/2?\n\nThanks!\n— Maya",
    ),
    (
        "Ask Prof. Kim for a letter by 10/15.",
        "Hi Prof. Kim —\n\nWould you write my letter? Due 10/15.\n\nThanks!\n— Maya",
    ),
    (
        "Tell Lena the hood in 310 beeps.",
        "Hi Lena —\n\nThe hood in 310 has beeped since Mon.\n\nThanks!\n— Maya",
    ),
    (
        "Invite the lab to lunch Thu 6/5.",
        "Hi all —\n\nLunch on me, Thu 6/5 at noon.\n\nThanks!\n— Maya",
    ),
]


def _write_synth(ws: Workspace) -> None:
    rows = [
        {"id": f"in-{i}", "seed": "s", "status": "accepted",
         "messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
        for i, (a, b) in enumerate(SYNTH)
    ]  # fmt: skip
    ws.result("synthetic_personalized_data.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )


@needs_backend
async def test_evaluate_after_sft(ws: Workspace):
    _write_synth(ws)
    sft = await Runner(ws).run("sft", ["sft.steps=2", "sft.sample_after=false", "sft.eval_every=1"])
    assert isinstance(sft, StageFinished), sft
    split = workspace_split(ws, load_config(ws.config_path).data, record=False)
    held_inputs = [d["input"] for d in split.holdout]
    assert len(held_inputs) == 2
    ws.result("rl_dev_data.jsonl").write_text(
        json.dumps({"prompt_conversation": [{"role": "user", "content": "Thank Jo for the cake."}]})
        + "\n"
    )
    append_preference(ws.results_dir, preference_record(held_inputs[0], "sft", "baseline", "a"))
    events = [
        e
        async for e in Runner(ws).run_stage(
            "evaluate", ["evaluate.samples=2", "evaluate.max_tokens=12", "evaluate.dev_prompts=1"]
        )
    ]
    final = events[-1]
    assert isinstance(final, StageFinished), final
    data = json.loads(ws.result("evaluation.json").read_text())
    names = [m["name"] for m in data["methods"]]
    assert names == ["baseline", "prompting", "few-shot", "sft"]
    few = next(m for m in data["methods"] if m["name"] == "few-shot")
    assert few["examples"] == len(split.train) == 8
    # the held-out demonstrations are the ones measured, and nothing else
    assert data["holdout"]["inputs"] == held_inputs
    rows = [json.loads(x) for x in ws.result("evaluation_samples.jsonl").read_text().splitlines()]
    held_rows = [r for r in rows if r["kind"] == "sample"]
    assert {r["input"] for r in held_rows} == set(held_inputs)
    assert len(held_rows) == 4 * 2 * 2
    assert {r["person_output"] for r in held_rows} == {d["output"] for d in split.holdout}
    # MiniLM similarity ran (on the local service's compute thread), one value per sample
    assert not any("similarity skipped" in getattr(e, "message", "") for e in events)
    assert all(-1.0 <= r["similarity"] <= 1.0 for r in held_rows if r["output"].strip())
    for m in names:
        met = data["metrics"][m]
        assert met["nll"]["n"] == 2 and met["nll"]["mean"] > 0 and met["nll"]["tokens"] > 0
        assert met["style_distance"]["n"] >= 1 or all(
            not r["output"].strip() for r in held_rows if r["method"] == m
        )
        assert met["cost"]["samples"] == 4
        assert "judge_vs_all" in met
    # NLL is traceable: the per-request rows pool to the summary
    nll_rows = [r for r in rows if r["kind"] == "nll" and r["method"] == "sft"]
    pooled = sum(r["nll_total"] for r in nll_rows) / sum(r["tokens"] for r in nll_rows)
    assert pooled == pytest.approx(data["metrics"]["sft"]["nll"]["mean"])
    # few-shot has the examples in context, so its NLL differs from the base's
    assert data["metrics"]["few-shot"]["nll"]["mean"] != data["metrics"]["baseline"]["nll"]["mean"]
    # the judge: 6 pairs x 2 requests x 2 samples on held-out, 3 methods vs base on 1 dev prompt
    judgements = [
        json.loads(x) for x in ws.result("evaluation_judgements.jsonl").read_text().splitlines()
    ]
    assert sum(j["set"] == "heldout" for j in judgements) == 24
    assert sum(j["set"] == "dev" for j in judgements) == 3
    for j in judgements:  # both orders' margins, the balanced preference and the bias
        assert j["combined_by"] == "calibrated"
        assert j["s"] == pytest.approx((j["m_ab"] - j["m_ba"]) / 2)
        assert j["b"] == pytest.approx((j["m_ab"] + j["m_ba"]) / 2)
    stats = data["judge"]["stats"]
    assert stats["comparisons"] == 27 and stats["mean_position_bias"] is not None
    assert stats["decided_share"] == (stats["wins_a"] + stats["wins_b"]) / 27
    # the judge's accuracy: the person's held-out text against the base and few-shot samples
    acc = data["judge"]["accuracy"]
    assert acc["vs_base"]["n"] <= 4 and acc["vs_few_shot"]["n"] <= 4 and acc["vs_base"]["n"]
    assert isinstance(data["judge"]["warnings"], list)
    # judging reports progress batch by batch, not once at the end
    judged = [e.done for e in events if isinstance(e, Progress) and e.label == "evaluate: judging"]
    assert judged == [0, JUDGE_CHUNK, 27]
    # the dev samples move per request finished (4 methods x 1 dev prompt), not once at the end
    dev = [e.done for e in events if isinstance(e, Progress) and e.label == "evaluate: dev samples"]
    assert dev == [0, 1, 2, 3, 4]
    assert data["judge_matrix"]["sft"]["baseline"]["n"] == 4
    assert set(data["dev_win_rates"]) == {"prompting", "few-shot", "sft"}
    assert data["human"]["n_picks"] == 1 and data["human"]["agreement"]["n"] == 1
    assert data["metrics"]["sft"]["cost"]["training"]["steps"] == 2
    # events streamed
    assert {e.source for e in events if isinstance(e, SampleProduced)} == set(names)
    assert any(isinstance(e, Metric) and e.name == "eval/nll/sft" for e in events)
    # report and plots
    report = ws.result("report.md").read_text()
    assert "| SFT |" in report and "few-shot" in report and "## Analysis" in report
    assert "![NLL per method](plots/nll.png)" in report
    for name in ("nll.png", "win_rates.png", "training_sft.png"):
        png = ws.results_dir / "plots" / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"plots/{name}" in report
    assert held_inputs[0] in report  # one held-out request with every answer

    from engine.eval.report import load_report

    rep = load_report(ws)
    assert rep is not None and [r["method"] for r in rep.rows] == names
    assert rep.matrix["methods"] == names and rep.requests[0]["input"] == held_inputs[0]
    assert set(rep.requests[0]["answers"]) == set(names)


@needs_backend
async def test_evaluate_without_holdout_says_why(ws: Workspace):
    demos = ws.load_demos()[:4]
    ws.save_demos(demos)
    final = await Runner(ws).run("evaluate")
    assert isinstance(final, StageFailed)
    assert "held out" in final.message and "Add demonstrations" in final.message


@needs_backend
async def test_evaluate_flags_a_checkpoint_trained_with_another_split(ws: Workspace):
    """sft records the held-out set and its context; a bad judge fails before any sampling;
    after the held-out set changes, evaluate still measures sft but flags it."""
    from engine.store.checkpoints import latest_checkpoint, record_checkpoint
    from engine.store.split import set_holdout, split_fingerprint

    _write_synth(ws)
    sft = await Runner(ws).run("sft", ["sft.steps=1", "sft.sample_after=false"])
    assert isinstance(sft, StageFinished), sft
    cfg = load_config(ws.config_path)
    split = workspace_split(ws, cfg.data, record=False)
    entry = latest_checkpoint(ws.results_dir, "sft")
    assert entry["holdout"] == split_fingerprint(split)
    assert entry["use_system_prompt"] is cfg.sft.use_system_prompt

    quick = ["evaluate.samples=1", "evaluate.max_tokens=4", "evaluate.dev_prompts=0"]
    # a recorded judge checkpoint that cannot be opened fails before anything is sampled
    record_checkpoint(
        ws.results_dir, "reward-model", sampler_path=str(ws.root / "no-such-checkpoint"),
        finished=True, base_model=cfg.models.judge, backend="local", mode="verdict",
    )  # fmt: skip
    events = [e async for e in Runner(ws).run_stage("evaluate", quick)]
    assert isinstance(events[-1], StageFailed), events[-1]
    assert "cannot open the judge" in events[-1].message
    assert not [e for e in events if isinstance(e, SampleProduced)]
    record_checkpoint(ws.results_dir, "reward-model", use_base=True)

    # the person marks two other demonstrations as held out after training
    set_holdout(ws, [d["input"] for d in split.train[:2]])
    final = await Runner(ws).run(
        "evaluate", [*quick, "evaluate.judge=false", "evaluate.embedding=false"]
    )
    assert isinstance(final, StageFinished), final
    data = json.loads(ws.result("evaluation.json").read_text())
    by = {m["name"]: m for m in data["methods"]}
    assert by["sft"]["split_changed"] is True and "split_changed" not in by["baseline"]
    report = ws.result("report.md").read_text()
    assert f"| SFT {ev.SPLIT_CHANGED_MARK} |" in report


@needs_backend
async def test_evaluate_measures_the_finished_run_while_a_retrain_is_unfinished(
    ws: Workspace, monkeypatch
):
    """A retrain that died (say, a full disk) leaves [sft] at its step-2 checkpoint while the
    stage's results are still the finished run's: evaluate measures that finished run, says so,
    and records which one it measured."""
    import engine.stages.sft as sft_stage
    from engine.store.checkpoints import latest_checkpoint

    _write_synth(ws)
    done = await Runner(ws).run("sft", ["sft.steps=2", "sft.sample_after=false"])
    assert isinstance(done, StageFinished), done
    finished = latest_checkpoint(ws.results_dir, "sft")
    real = sft_stage.supervised_step
    calls = {"n": 0}

    async def dies_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated disk full")
        return await real(*a, **k)

    monkeypatch.setattr(sft_stage, "supervised_step", dies_at_step_3)
    retrain = ["sft.steps=4", "sft.lr=0.01", "sft.sample_after=false", "sft.checkpoint_every=2"]
    assert isinstance(await Runner(ws).run("sft", retrain), StageFailed)
    monkeypatch.undo()
    entry = latest_checkpoint(ws.results_dir, "sft")
    assert entry["finished"] is False and entry["step"] == 2
    assert entry["last_finished"]["sampler_path"] == finished["sampler_path"]

    quick = ["evaluate.samples=1", "evaluate.max_tokens=4", "evaluate.dev_prompts=0"]
    quick += ["evaluate.judge=false", "evaluate.embedding=false"]
    events = [e async for e in Runner(ws).run_stage("evaluate", quick)]
    assert isinstance(events[-1], StageFinished), events[-1]
    assert any(
        isinstance(e, LogLine) and "sft: its latest run is unfinished" in e.message for e in events
    )
    data = json.loads(ws.result("evaluation.json").read_text())
    sft = next(m for m in data["methods"] if m["name"] == "sft")
    assert sft["sampler_path"] == finished["sampler_path"] and sft["step"] == 2
