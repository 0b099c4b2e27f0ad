"""Results/checkpoints.toml read through one
checked reader. A stage that reads an unreadable registry, or an entry of it with a wrong
type, stops in preflight (no run folder, nothing written over) with a message naming the
file, the entry and the expected type; an entry nobody can parse is kept on the next write."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.pipeline.runner import Runner, list_runs
from engine.run.context import StageContext
from engine.run.events import LogLine, StageFailed, StageFinished
from engine.store import results
from engine.store.checkpoints import RegistryError, latest_checkpoint, record_checkpoint
from engine.store.workspace import Workspace

CORPUS = Path(__file__).resolve().parent.parent / "data" / "malformed" / "checkpoints"

# (stage run, registry text, what the message must say)
WRONG = [
    ("rlaif", '[rlaif]\nstep = "four"\n', '[rlaif] step must be a whole number, not "four"'),
    ("ditto", '[ditto]\nround = "x"\n', '[ditto] round must be a whole number, not "x"'),
    ("sft", "[sft]\nsampler_path = 5\n", "[sft] sampler_path must be a string, not 5"),
    (
        "rlaif",
        "[reward-model]\nsampler_path = []\n",
        "[reward-model] sampler_path must be a string",
    ),
    ("rlaif", "[sft]\nfinished = 1\n", "[sft] finished must be true or false, not 1"),
    ("reward-model", "reward-model = 5\n", "[reward-model] must be a table"),
    ("evaluate", '[ditto]\nstep = "2"\n', "[ditto] step must be a whole number"),
]
READERS = ("sft", "reward-model", "rlaif", "ditto", "evaluate")


def _inputs(ws: Workspace) -> None:
    """The files the stages' own preflight asks for (they need not be right: the registry is
    checked before any of them is read)."""
    for name in (
        "synthetic_personalized_data.jsonl",
        "rl_train_data.jsonl",
        "baseline_results.json",
    ):
        ws.result(name).parent.mkdir(parents=True, exist_ok=True)
        ws.result(name).write_text("{}\n")


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(("stage", "text", "said"), WRONG, ids=[w[1][:18] for w in WRONG])
async def test_a_wrong_type_stops_the_stage_before_it_starts(ws, stage, text, said):
    _inputs(ws)
    ws.result("checkpoints.toml").write_text(text)
    before = _files(ws.root)
    final = await Runner(ws).run(stage)
    assert isinstance(final, StageFailed) and not final.cancelled, final
    assert final.message.startswith("results/checkpoints.toml: ") and said in final.message
    assert "Traceback" not in final.message and "Error:" not in final.message
    assert list_runs(ws) == [] and _files(ws.root) == before  # no run folder, nothing written


@pytest.mark.parametrize("stage", READERS)
async def test_a_truncated_registry_stops_every_stage_that_reads_it(ws, stage):
    """They trained until their first checkpoint, and rlaif fell back to the base
    model and the base judge, before failing."""
    _inputs(ws)
    ws.result("checkpoints.toml").write_bytes((CORPUS / "truncated.toml").read_bytes())
    final = await Runner(ws).run(stage)
    assert isinstance(final, StageFailed), final
    assert "results/checkpoints.toml: not valid TOML" in final.message
    assert list_runs(ws) == []


async def test_evaluate_never_writes_a_narrower_result_over_a_wider_one(ws):
    """Evaluate exited 0 with 3 methods over a six-method evaluation.json, using the base
    judge, when it could not read the registry."""
    ws.results_dir.mkdir(exist_ok=True)
    wide = {"methods": [{"name": m} for m in ("baseline", "prompting", "few-shot", "sft")]}
    results.write_evaluation(ws.results_dir, wide)
    (ws.results_dir / "report.md").write_text("# the full report\n")
    ws.result("checkpoints.toml").write_text('[sft]\nsampler_path = "local:///x"\nstep = 4\n[rl')
    before = _files(ws.root)
    final = await Runner(ws).run("evaluate")
    assert isinstance(final, StageFailed) and "results/checkpoints.toml" in final.message
    assert _files(ws.root) == before
    # and where fewer methods are evaluated for another reason, it says so by name first
    assert results.methods_dropped(ws.results_dir, ["baseline", "few-shot"]) == ["prompting", "sft"]
    assert "prompting, sft" in results.narrower_warning(["prompting", "sft"])


def test_latest_checkpoint_raises_the_checked_error(tmp_path: Path):
    """ValueError: invalid literal for int() / AttributeError reached the person."""
    (tmp_path / "checkpoints.toml").write_text('[rlaif]\nstep = "four"\n[sft]\nstep = 3\n')
    with pytest.raises(RegistryError, match=r'\[rlaif\] step must be a whole number, not "four"'):
        latest_checkpoint(tmp_path, "rlaif")
    assert latest_checkpoint(tmp_path, "sft") == {"step": 3}  # a good entry still reads
    assert latest_checkpoint(tmp_path, "ditto") is None
    (tmp_path / "checkpoints.toml").write_text("[sft\n")
    with pytest.raises(RegistryError, match="checkpoints.toml: not valid TOML"):
        latest_checkpoint(tmp_path, "sft")


def test_recording_keeps_what_it_cannot_parse(tmp_path: Path):
    """``sft = 5`` was silently dropped the next time any checkpoint was recorded."""
    path = tmp_path / "checkpoints.toml"
    path.write_text('sft = 5\n[ditto]\nround = "x"\nnote = [1, 2]\n')
    record_checkpoint(tmp_path, "rlaif", step=2, sampler_path="local:///r")
    data = tomllib.loads(path.read_text())
    assert data["sft"] == 5 and data["ditto"] == {"round": "x", "note": [1, 2]}
    assert data["rlaif"]["step"] == 2
    with pytest.raises(RegistryError, match=r"\[sft\] must be a table"):
        record_checkpoint(tmp_path, "sft", step=1)  # never over what it cannot read
    assert tomllib.loads(path.read_text())["sft"] == 5


@dataclass(frozen=True)
class _Spec:
    run: Any
    trains: bool = True


async def _records(ctx: StageContext):
    record_checkpoint(ctx.workspace.results_dir, "sft", step=1, sampler_path="local:///s")
    yield StageFinished(stage=ctx.stage)


async def test_a_bad_entry_another_stage_owns_is_named_in_the_log_and_kept(ws: Workspace):
    """A stage that does not read the bad entry runs, names it once, and keeps it."""
    _inputs(ws)
    ws.result("checkpoints.toml").write_text("ditto = 5\n")
    events = [e async for e in Runner(ws, stages={"sft": _Spec(_records)}).run_stage("sft")]
    assert isinstance(events[-1], StageFinished), events[-1]
    warned = [e.message for e in events if isinstance(e, LogLine) and e.level == "warning"]
    assert len(warned) == 1 and "results/checkpoints.toml: [ditto] must be a table" in warned[0]
    assert "kept as written" in warned[0]
    assert tomllib.loads(ws.result("checkpoints.toml").read_text())["ditto"] == 5


@pytest.mark.parametrize("stage", ["evaluate", "rlaif", "ditto"])
async def test_an_unwritable_runs_folder_stops_before_any_work(ws, stage, monkeypatch):
    """Evaluate, rlaif and ditto failed only after all their work on a full disk."""
    import errno
    import os

    _inputs(ws)
    ws.runs_dir.mkdir(exist_ok=True)
    real_open = os.open

    def full(path, flags, *a, **kw):
        if Path(path).parent == ws.runs_dir and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", full)
    final = await Runner(ws).run(stage)
    assert isinstance(final, StageFailed), final
    assert f"could not write {ws.runs_dir}: No space left on device" in final.message
    assert list_runs(ws) == []


def test_status_json_is_unchanged_by_a_bad_registry(ws: Workspace):
    """Views stay usable: a bad entry is left out of the status, never raised."""
    from engine.pipeline.runner import stage_status

    ws.results_dir.mkdir(exist_ok=True)
    ws.result("checkpoints.toml").write_text('[sft]\nstep = "x"\n[rlaif]\nstep = 2\n')
    rows = {s.name: s for s in stage_status(ws)}
    assert rows["sft"].checkpoint == {} and rows["rlaif"].checkpoint["step"] == 2
    assert json.dumps([r.checkpoint for r in rows.values()])


async def test_the_app_warns_about_an_unreadable_registry(ws: Workspace):
    """The app showed no warning for an unreadable registry in any tab."""
    from tui_helpers import until

    from tui.app import create_app

    ws.results_dir.mkdir(exist_ok=True)
    ws.result("checkpoints.toml").write_text('[sft]\nsampler_path = "local:///x"\nstep = ')
    app = create_app(ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.wait_ready()

        def warned() -> list[str]:
            return [
                str(n.message)
                for n in app._notifications
                if "results/checkpoints.toml: not valid TOML" in str(n.message)
            ]

        await until(pilot, lambda: bool(warned()))
        assert all(
            n.severity == "warning" for n in app._notifications if str(n.message) in warned()
        )


@pytest.mark.parametrize(
    ("stage", "args", "said"),
    [
        ("rlaif", [], "results/rl_train_data.jsonl not found: run `persona run rl-prompts` first"),
        ("reward-model", [], "No judge training data: run `persona run baseline`"),
        (
            "reward-model",
            ["reward_model.validate_only=true"],
            "results/baseline_results.json not found: run `persona run baseline` first",
        ),
    ],
)
async def test_missing_inputs_refuse_before_a_run_folder(ws, stage, args, said):
    """Rlaif and reward-model made a run folder (and a failed run the app then
    showed over the finished one) before finding their inputs missing."""
    final = await Runner(ws).run(stage, args)
    assert isinstance(final, StageFailed) and final.message.startswith(said), final
    assert list_runs(ws) == []


def test_persona_status_names_an_unreadable_registry(ws: Workspace, capsys):
    from engine.cli import main

    ws.results_dir.mkdir(exist_ok=True)
    ws.result("checkpoints.toml").write_text('[rlaif]\nstep = "four"\n')
    assert main(["-C", str(ws.root), "status"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert 'results/checkpoints.toml: [rlaif] step must be a whole number, not "four"' in out
