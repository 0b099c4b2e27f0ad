"""Cross-validation: folds partition the demonstrations and stay put for a seed; a fold whose
checkpoint records another held-out set is refused; the cost is k x each stage's estimate; an
unfinished plan is continued or refused; a cancel leaves the running fold stage pending; and
end to end on the tiny model with 3 folds, killed (-9) in fold 2's evaluate and rerun: every
file written, pooled n = the demonstrations, no finished fold stage repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, hand_profile, needs_backend

from engine.crossval import CrossvalError, choose_plan, deal_folds, pending, stages_for
from engine.crossval.folds import fold_split, method_names, prepare_workspace
from engine.crossval.pool import check_fold
from engine.crossval.run import fold_stages
from engine.pipeline.runner import list_runs, run_state
from engine.store.checkpoints import read_registry, record_checkpoint
from engine.store.config import ConfigError
from engine.store.split import split_fingerprint
from engine.store.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent

FAST = [
    "ditto.rounds=1",
    "ditto.steps_per_round=1",
    "ditto.sft_max_steps=2",
    "ditto.sft_lr=0.01",
    "ditto.samples_per_demo=1",
    "ditto.batch_prompts=2",
    "ditto.pairs_per_prompt=1",
    "ditto.max_tokens=4",
    "ditto.rank=4",
    "ditto.max_length=128",
    "ditto.sample_after=false",
    "evaluate.samples=1",
    "evaluate.few_shot_examples=2",
    "evaluate.max_tokens=4",
    "evaluate.dev_prompts=0",
    "evaluate.embedding=false",
    "evaluate.judge=false",
    "crossval.resamples=500",
]


def _demos(n: int) -> list[dict[str, str]]:
    return [{"input": f"Write to person {i} about day {i}", "output": f"Hi {i}"} for i in range(n)]


def test_folds_partition_and_are_stable_for_a_seed():
    demos = _demos(10)
    folds = deal_folds(demos, 3, seed=7)
    flat = sorted(i for f in folds for i in f)
    assert flat == list(range(10))  # every demonstration held out exactly once
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert deal_folds(demos, 3, seed=7) == folds
    # the same requests in another order: the same requests in the same folds
    order = list(reversed(range(10)))
    again = deal_folds([demos[i] for i in order], 3, seed=7)
    assert sorted(sorted(order[i] for i in f) for f in again) == sorted(folds)
    assert deal_folds(demos, 3, seed=8) != folds  # another seed deals otherwise
    with pytest.raises(CrossvalError, match="leave 2 for training"):
        deal_folds(_demos(5), 2, seed=0)  # 3 held out of 5 leaves 2
    with pytest.raises(CrossvalError, match="at least 2 folds"):
        deal_folds(demos, 1, seed=0)


def test_stages_for_methods():
    assert stages_for(["baseline", "few-shot", "sft-demos", "ditto"]) == ["ditto", "evaluate"]
    assert stages_for(["baseline", "sft"]) == ["synth-inputs", "synth-outputs", "sft", "evaluate"]
    assert method_names(["base", "prompted", "baseline", "ditto"]) == [
        "baseline",
        "prompting",
        "ditto",
    ]
    with pytest.raises(CrossvalError, match="unknown 'dpo'"):
        stages_for(["dpo"])


def test_plan_is_continued_or_refused(ws: Workspace):
    cfg = ws.config(["crossval.folds=3"])
    plan, continuing = choose_plan(ws, cfg, ["crossval.folds=3"], None)
    assert not continuing and plan.k == 3 and plan.stages == ["ditto", "evaluate"]
    assert plan.shared == []  # the default methods need no shared stage
    plan.root.mkdir(parents=True)
    plan.save()
    again, continuing = choose_plan(ws, cfg, ["crossval.folds=3"], None)
    assert continuing and again.root == plan.root and again.holdouts == plan.holdouts
    assert pending(again) == fold_stages(again)  # nothing ran yet
    with pytest.raises(CrossvalError, match="is unfinished.*--new"):
        choose_plan(ws, ws.config(["crossval.folds=4"]), ["crossval.folds=4"], None)
    fresh, continuing = choose_plan(ws, ws.config(), [], None, new=True)
    assert not continuing and fresh.k == 5
    plan.finished = True  # a finished plan: the same request pools it again, another is new
    plan.save()
    assert choose_plan(ws, cfg, ["crossval.folds=3"], None)[0].root == plan.root
    other, continuing = choose_plan(ws, ws.config(["crossval.folds=4"]), ["crossval.folds=4"], None)
    assert not continuing and other.k == 4
    with pytest.raises(ConfigError):
        ws.config(["crossval.methods=3"])


def test_shared_stages_run_once_and_their_outputs_reach_every_fold(ws: Workspace):
    from engine.crossval import Crossval
    from engine.store.results import RESULT_FILES

    over = ["crossval.folds=2", 'crossval.methods=["baseline", "rlaif"]']
    plan, _ = choose_plan(ws, ws.config(over), over, None)
    assert plan.shared == ["baseline", "prompting"]  # independent of the split
    assert plan.stages[-2:] == ["rlaif", "evaluate"] and "baseline" not in plan.stages
    assert fold_stages(plan)[:2] == [(0, "baseline"), (0, "prompting")]
    cv = Crossval(ws, plan)
    shared = cv._workspace(0)
    shared.result(RESULT_FILES["baseline"]).write_text("[]")
    fold = cv._workspace(2)
    assert fold.result(RESULT_FILES["baseline"]).read_text() == "[]"
    assert not fold.result(RESULT_FILES["prompting"]).exists()  # not made yet: nothing copied


def test_fold_workspace_fixes_its_holdout_and_reads_the_person_only(ws: Workspace, tmp_path):
    before = {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()}
    plan, _ = choose_plan(ws, ws.config(["crossval.folds=3"]), ["crossval.folds=3"], None)
    fold = prepare_workspace(ws, plan.fold_dir(2), plan.holdouts[1])
    split = fold_split(fold)
    assert [d["input"] for d in split.holdout] == plan.holdouts[1]
    assert len(split.train) == 10 - len(plan.holdouts[1])
    after = {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file() and "runs" not in p.parts}
    assert after == before  # the person's files untouched
    assert (fold.root / ".env").is_symlink()  # secrets linked, never copied


def test_status_of_the_latest_cross_validation(ws: Workspace):
    """What the Train tab's crossval row says: not run, unfinished (how much is left), done."""
    from engine.crossval.run import crossval_status

    assert (crossval_status(ws).state, crossval_status(ws).run_dir) == ("not run", "")
    plan, _ = choose_plan(ws, ws.config(["crossval.folds=2"]), ["crossval.folds=2"], None)
    plan.root.mkdir(parents=True)
    plan.save()
    st = crossval_status(ws)
    n = len(fold_stages(plan))
    assert (st.state, st.run_dir) == ("unfinished", ws.rel(plan.root))
    assert st.message.startswith(f"{n} of {n} fold stages left; next: fold 1/2 · ditto")
    plan.finished = True
    plan.save()
    ws.result("crossval_report.md").write_text("# pooled\n", encoding="utf-8")
    st = crossval_status(ws)
    assert (st.state, st.outputs) == ("done", ["results/crossval_report.md"])


def _preference_rows(n: int) -> str:
    row = {
        "orig_instruction": "Write a haiku",
        "orig_response_A": "a",
        "orig_response_B": "b",
        "orig_criteria": "Is it a haiku?",
        "orig_reference_answer": "ref",
        "orig_preference": "A",
        "orig_feedback": "fine",
    }
    return "\n".join(json.dumps({**row, "orig_response_A": f"a{i}"}) for i in range(n))


def test_fold_reads_the_persons_relative_dataset_file(ws: Workspace, tmp_path, monkeypatch):
    """reward_model.dataset relative to the person's workspace (persona.toml or --set) still
    names the person's file inside a fold, whatever folder the command runs from."""
    from engine.crossval import Crossval
    from engine.run.context import StageContext
    from engine.stages.reward_model import _gather_examples

    (ws.root / "prefs").mkdir()
    (ws.root / "prefs" / "pc.jsonl").write_text(_preference_rows(6), encoding="utf-8")
    (ws.root / "other.jsonl").write_text(_preference_rows(9), encoding="utf-8")
    toml = ws.config_path.read_text(encoding="utf-8")
    assert "[reward_model]" not in toml
    toml += '\n[reward_model]\ndataset = "prefs/pc.jsonl"\nown_pairs = false\n'
    ws.config_path.write_text(toml, encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # started from another folder: the workspace's file is meant

    over = ['reward_model.dataset="other.jsonl"', "crossval.folds=2"]
    plan, _ = choose_plan(ws, ws.config(over), over, None)
    cv = Crossval(ws, plan)
    fold = cv._workspace(1)
    assert fold.config().reward_model.dataset == str(ws.root / "prefs" / "pc.jsonl")
    assert "[reward_model]" in fold.config_path.read_text(encoding="utf-8")

    def examples(overrides: list[str]) -> int:
        cfg = fold.config(overrides)
        ctx = StageContext(fold, cfg, "reward-model", fold.root / "runs" / "x")
        train, held, _notes = _gather_examples(ctx)
        return len(train) + len(held)

    assert examples([]) == 6  # persona.toml's file, read from the person's workspace
    assert examples(cv._overrides("reward-model")) == 9  # --set's, the same
    assert ws.config().reward_model.dataset == "prefs/pc.jsonl"  # the person's file untouched


def test_mismatched_fold_checkpoint_is_refused(ws: Workspace):
    plan, _ = choose_plan(ws, ws.config(["crossval.folds=3"]), ["crossval.folds=3"], None)
    fold = prepare_workspace(ws, plan.fold_dir(1), plan.holdouts[0])
    good = split_fingerprint(fold_split(fold))
    evaluation = {
        "holdout": {"inputs": plan.holdouts[0]},
        "methods": [{"name": "baseline", "kind": "base"}, {"name": "ditto", "kind": "checkpoint"}],
    }
    fold.results_dir.mkdir(exist_ok=True)
    fold.result("evaluation.json").write_text(json.dumps(evaluation))
    record_checkpoint(fold.results_dir, "ditto", sampler_path="x", holdout=good)
    assert check_fold(plan, 1)["evaluation"]["methods"][1]["name"] == "ditto"
    record_checkpoint(fold.results_dir, "ditto", holdout="0123456789abcdef")
    with pytest.raises(CrossvalError, match=r"fold 1 .*ditto checkpoint records held-out set") as e:
        check_fold(plan, 1)
    assert f"persona -C runs/{plan.root.name}/fold-1 run ditto`" in str(e.value)
    # an evaluation of other requests than the fold's is refused too
    record_checkpoint(fold.results_dir, "ditto", holdout=good)
    evaluation["holdout"]["inputs"] = plan.holdouts[1]
    fold.result("evaluation.json").write_text(json.dumps(evaluation))
    with pytest.raises(CrossvalError, match="other requests"):
        check_fold(plan, 1)


def test_cost_is_k_times_each_stage_on_the_largest_fold(ws: Workspace):
    from engine.backends.local.speed_profile import ProfileKey
    from engine.crossval.estimate import estimate_crossval

    key = ProfileKey("Test CPU", ("avx2",), "cpu", "bfloat16", 2, "2.13.0", TINY)
    profiles = {TINY: hand_profile(key)}
    plan, _ = choose_plan(ws, ws.config(["crossval.folds=3"]), ["crossval.folds=3"], None)
    before = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*"))
    cost = estimate_crossval(plan, ws, profiles)
    assert sorted(p.relative_to(ws.root) for p in ws.root.rglob("*")) == before  # no trace
    assert cost is not None and [(s.stage, s.times) for s in cost.stages] == [
        ("ditto", 3),
        ("evaluate", 3),
    ]
    assert cost.seconds == pytest.approx(3 * sum(s.seconds for s in cost.stages))
    # the largest fold holds out 4 of 10: ditto trains on 6, evaluate prices all 5 methods
    ditto, evaluate = cost.stages
    assert any("6 demos ×" in a for a in ditto.assumptions), ditto.assumptions
    assert any("5 methods × 4 held-out requests" in a for a in evaluate.assumptions)
    assert cost.line().startswith("≤ ") and "largest fold (4" in cost.notes[0]


def _runs(ws: Path, stage: str) -> list[Path]:
    return list_runs(Workspace(ws), stage)


def _until(predicate, what: str, proc: subprocess.Popen, limit: float = 240.0) -> None:
    """Wait for a state of the child's files; fail if the child ends first (bounded)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"crossval ended (rc {proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} within {limit} s"
        time.sleep(0.05)


@needs_backend
def test_end_to_end_killed_in_fold_2_then_continued(ws: Workspace, tmp_path: Path):
    args = ["crossval", "--folds", "3", "--no-estimate"] + [x for s in FAST for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "child.log", "w")  # noqa: SIM115 - closed below
    child = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "-C", str(ws.root), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def cv_root() -> Path | None:
            found = sorted(ws.runs_dir.glob("crossval-*"))
            return found[0] if found else None

        _until(lambda: cv_root() is not None and (cv_root() / "fold-2").exists(), "fold 2", child)
        fold2 = cv_root() / "fold-2"
        _until(lambda: len(_runs(fold2, "evaluate")) == 1, "fold 2's evaluate", child)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        log.close()
    root = cv_root()
    fold1 = root / "fold-1"
    assert run_state(_runs(fold2, "evaluate")[0])[0] == "interrupted"
    done_before = {
        (f.name, s): _runs(f, s)[0]
        for f, stages in ((fold1, ("ditto", "evaluate")), (fold2, ("ditto",)))
        for s in stages
    }
    assert all(run_state(r)[0] == "done" for r in done_before.values())
    # rerun: it continues with fold 2's evaluate
    from engine.cli import main

    assert main(["-C", str(ws.root), *args]) == 0
    for (fold, stage), run in done_before.items():  # finished fold stages were not repeated
        assert _runs(root / fold, stage) == [run], (fold, stage)
    assert [run_state(r)[0] for r in _runs(fold2, "evaluate")] == ["interrupted", "done"]
    assert [p.name for p in ws.runs_dir.glob("crossval-*")] == [root.name]  # continued it
    # every file written, pooled over every demonstration
    for rel in ("crossval.json", "crossval_report.md", "plots/crossval_nll.png"):
        assert (ws.results_dir / rel).stat().st_size > 0, rel
    data = json.loads(ws.result("crossval.json").read_text())
    n = len(ws.load_demos())
    assert data["n_demonstrations"] == n and data["folds"] == 3
    assert sorted(d["demo"] for d in data["per_demonstration"]) == list(range(1, n + 1))
    for name in ("baseline", "prompting", "few-shot", "sft-demos", "ditto"):
        assert data["methods"][name]["nll"]["n"] == n, name
    registry = read_registry(fold2 / "results")
    fingerprint = split_fingerprint(fold_split(Workspace(fold2)))
    assert registry["ditto"]["holdout"] == registry["sft-demos"]["holdout"] == fingerprint
    vs_few = data["paired"]["by_reference"]["few-shot"]["ditto"]["nll"]
    assert vs_few["n"] == n and len(vs_few["ci"]) == 2 and 0 <= vs_few["sign_test_p"] <= 1
    # each fold's own (single-split) evaluation carries its paired differences, in words
    fold_eval = json.loads((fold2 / "results" / "evaluation.json").read_text())
    held2 = len(fold_eval["holdout"]["inputs"])
    single = fold_eval["paired"]["by_reference"]["few-shot"]["ditto"]["nll"]
    assert single["n"] == held2 < 5 and single["ci"] is None
    words = f"no difference measurable with {held2} demonstrations"
    assert single["verdict"] == words and words in (fold2 / "results" / "report.md").read_text()
    report = ws.result("crossval_report.md").read_text()
    assert "Against few-shot" in report and "n=10" in report
    assert json.loads((root / "crossval.json").read_text())["finished"] is True


@needs_backend
async def test_cancel_stops_in_the_running_fold_stage_and_leaves_it_pending(ws: Workspace):
    from engine.crossval import Crossval, FoldEvent
    from engine.run.events import StageFailed, StageStarted

    over = [*FAST, "crossval.folds=2", 'crossval.methods=["baseline", "few-shot"]']
    plan, _ = choose_plan(ws, ws.config(over), over, None)
    cv = Crossval(ws, plan)
    final = None
    async for item in cv.run():
        if isinstance(item, FoldEvent) and isinstance(item.event, StageStarted):
            assert (item.where, item.index, item.total) == ("fold 1/2 · evaluate", 1, 2)
            cv.cancel()
        if not isinstance(item, FoldEvent):
            final = item
    assert isinstance(final, StageFailed) and final.cancelled
    assert "stopped in fold 1/2 (evaluate)" in final.message
    assert pending(plan) == [(1, "evaluate"), (2, "evaluate")]
    assert not ws.result("crossval.json").exists()
