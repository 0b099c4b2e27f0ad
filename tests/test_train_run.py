"""The training lifecycle (engine.run.train_run) as each training stage builds it: every setting
in the fingerprint starts a finished run fresh, every setting outside it reuses the run, a
run that only grew continues, and each decision says why in words."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from engine.run.context import StageContext
from engine.run.train_run import NOT_FINGERPRINTED, TrainRun
from engine.stages import ditto, reward_model, rlaif, sft
from engine.store.config import load_config
from engine.store.settings import PersonaConfig
from engine.store.workspace import Workspace

CONVS = [
    [
        {"role": "user", "content": f"Ask {n} about the {n}th"},
        {"role": "assistant", "content": "ok"},
    ]
    for n in range(6)
]
ROWS = [{"prompt_conversation": c[:1], "rubric": "short"} for c in CONVS]


def _ctx(ws: Workspace, overrides: dict[str, Any] | None = None) -> StageContext:
    cfg = load_config(ws.config_path, overrides or {})
    return StageContext(workspace=ws, config=cfg, stage="x", run_dir=ws.root / "runs" / "r1")


def _builders() -> dict[str, tuple[str, Any, Any]]:
    """stage -> (config section, settings filter, builder(ctx) -> TrainRun)."""
    return {
        "sft": ("sft", lambda k: True, lambda ctx: sft.train_run_for(ctx, CONVS)),
        "reward-model": (
            "reward_model",
            lambda k: True,
            lambda ctx: reward_model.train_run_for(ctx, CONVS, "verdict"),
        ),
        "rlaif": ("rlaif", lambda k: True, lambda ctx: rlaif.train_run_for(ctx, ROWS, None, True)),
        "sft-demos": (
            "ditto",
            ditto._sft_setting,
            lambda ctx: ditto.sft_run_for(ctx, ctx.split().train),
        ),
        "ditto": (
            "ditto",
            lambda k: not ditto._sft_setting(k),
            lambda ctx: (
                ditto._Rounds(
                    ctx, ctx.split().train, "m", "h", {"sampler_path": "local:///sft-init"}
                ).run
            ),
        ),
    }


def _other_value(cls: type, name: str, value: Any) -> Any:
    """A valid value for setting ``name`` of section ``cls`` that differs from ``value``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta, tp = f.metadata, typing.get_type_hints(cls)[name]
    if meta.get("choices"):
        return next(c for c in meta["choices"] if c != value)
    if tp is bool:
        return not value
    if tp is int:
        return value + 1 if meta.get("le") is None or value + 1 <= meta["le"] else value - 1
    if tp is float:
        if meta.get("lt") is not None or meta.get("le") is not None:
            return value / 2 if value else 0.1
        return value * 2 if value else 0.5
    if tp is str:
        return value + "x"
    if typing.get_origin(tp) is tuple:
        return [0.5, 0.3, 0.2] if name == "mix" else [*value, 1]
    raise AssertionError(f"no other value for {name}: {tp}")


def _finish(run: TrainRun) -> None:
    """Record ``run`` as a finished training (what its last save records)."""
    run.step = run.total
    run.record("local:///final-sampler", "local:///final-state", "final", True)


STAGES = list(_builders())


@pytest.mark.parametrize("stage", STAGES)
def test_each_setting_starts_fresh_or_reuses_and_says_why(ws: Workspace, stage: str):
    section, mine, build = _builders()[stage]
    first = build(_ctx(ws))
    _finish(first)
    again = build(_ctx(ws))
    same = again.decide()
    assert same.action == "reuse" and "reusing it" in same.why, same

    cls = type(getattr(PersonaConfig(), section))
    checked = 0
    for f in dataclasses.fields(cls):
        if not mine(f.name):
            continue
        key = f"{section}.{f.name}"
        current = getattr(getattr(_ctx(ws).config, section), f.name)
        new = _other_value(cls, f.name, list(current) if isinstance(current, tuple) else current)
        run = build(_ctx(ws, {key: new}))
        decision = run.decide()
        if key in first.length_keys and run.growable:
            assert decision.action in ("resume", "fresh", "reuse"), key
            if run.total > first.total:
                assert decision.action == "resume" and "continuing" in decision.why, key
            elif run.total < first.total:
                assert decision.action == "fresh" and "below" in decision.why, key
            continue
        if f.name in NOT_FINGERPRINTED:
            assert decision.action == "reuse", (key, decision)
            assert f"{key} changed, which cannot change" in run.explain(decision).message, key
        else:
            assert decision.action == "fresh", (key, decision)
            assert f"{key} changed" in decision.why and "from the start" in decision.why, key
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("key", ["optimizer.beta2", "optimizer.weight_decay"])
def test_optimizer_settings_are_fingerprinted(ws: Workspace, key: str):
    _finish(sft.train_run_for(_ctx(ws), CONVS))
    decision = sft.train_run_for(_ctx(ws, {key: 0.5}), CONVS).decide()
    assert decision.action == "fresh" and f"{key} changed" in decision.why


def test_rlaif_retrained_judge_starts_fresh(ws: Workspace):
    """The judge actually used is an input: a retrained reward model is a new judge."""
    model = _ctx(ws).config.model("judge")

    def judge_entry(path: str) -> None:
        rm = reward_model.train_run_for(_ctx(ws), CONVS, "verdict")
        rm.step = rm.total
        rm.record(path, path + "-state", "final", True)

    judge_entry("local:///judge-1")
    _finish(rlaif.train_run_for(_ctx(ws, {"rlaif.judge": "reward-model"}), ROWS, None, True))
    judge_entry("local:///judge-2")
    decision = rlaif.train_run_for(_ctx(ws), ROWS, None, True).decide()
    assert decision.action == "fresh", decision
    assert "the judge changed (local:///judge-1 -> local:///judge-2)" in decision.why
    assert model  # the base judge's name is what a run without a trained judge records


def test_unfinished_run_resumes_only_with_the_same_settings(ws: Workspace):
    run = rlaif.train_run_for(_ctx(ws, {"rlaif.steps": 8}), ROWS, None, True)
    run.step = 2
    run.record("local:///s2", "local:///s2-state", "step-000002", False)
    same = rlaif.train_run_for(_ctx(ws, {"rlaif.steps": 8}), ROWS, None, True).decide()
    assert same.action == "resume" and same.step == 2
    assert same.why.startswith("resuming from step 2 of 8")
    other = rlaif.train_run_for(
        _ctx(ws, {"rlaif.steps": 8, "rlaif.temperature": 0.5}), ROWS, None, True
    ).decide()
    assert other.action == "fresh" and "rlaif.temperature changed (1.0 -> 0.5)" in other.why


def test_linear_schedule_makes_the_length_part_of_the_fingerprint(ws: Workspace):
    linear = {"sft.lr_schedule": "linear", "sft.steps": 8}
    run = sft.train_run_for(_ctx(ws, linear), CONVS)
    run.step = 4
    run.record("local:///s4", "local:///s4-state", "step-000004", False)
    longer = sft.train_run_for(_ctx(ws, {**linear, "sft.steps": 16}), CONVS).decide()
    assert longer.action == "fresh" and "sft.steps changed (8 -> 16)" in longer.why
    constant = sft.train_run_for(_ctx(ws, {"sft.steps": 8}), CONVS).decide()
    assert constant.action == "fresh" and "sft.lr_schedule changed" in constant.why


def test_an_unfinished_retrain_keeps_the_finished_run_recorded(ws: Workspace, tmp_path: Path):
    """While a fresh run is unfinished, the last finished one (whose outputs are the stage's
    results) stays in the registry under last_finished; finishing replaces it."""
    from engine.store.checkpoints import latest_checkpoint

    _finish(rlaif.train_run_for(_ctx(ws), ROWS, None, True))
    fresh = rlaif.train_run_for(_ctx(ws, {"rlaif.lr": 0.5}), ROWS, None, True)
    fresh.step = 2
    fresh.record("local:///new-2", "local:///new-2-state", "step-000002", False)
    entry = latest_checkpoint(ws.results_dir, "rlaif")
    assert entry and entry["finished"] is False and entry["sampler_path"] == "local:///new-2"
    assert entry["last_finished"]["sampler_path"] == "local:///final-sampler"
    assert entry["last_finished"]["finished"] is True
    fresh.step = fresh.total
    fresh.record("local:///new-final", "local:///new-final-state", "final", True)
    entry = latest_checkpoint(ws.results_dir, "rlaif")
    assert entry and entry["finished"] is True and "last_finished" not in entry


def test_status_names_the_finished_run_behind_an_unfinished_retrain(ws: Workspace):
    from engine.cli import _checkpoint_text
    from engine.store.checkpoints import latest_checkpoint

    _finish(rlaif.train_run_for(_ctx(ws), ROWS, None, True))
    assert _checkpoint_text(latest_checkpoint(ws.results_dir, "rlaif")) == "step 8"
    fresh = rlaif.train_run_for(_ctx(ws, {"rlaif.lr": 0.5}), ROWS, None, True)
    fresh.step = 2
    fresh.record("local:///new-2", "local:///new-2-state", "step-000002", False)
    text = _checkpoint_text(latest_checkpoint(ws.results_dir, "rlaif"))
    assert text == "step 2 (unfinished); results are from the finished run at step 8"
