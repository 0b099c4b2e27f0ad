"""Prompts & Rubric: f10 checks the rubric being edited with the judge (the reward-model
stage's validation, on the tiny model) and shows each verdict beside the two outputs."""

from __future__ import annotations

import hashlib
import json

from textual.widgets import Static, TextArea
from tui_helpers import until, write_method_outputs

from engine.store.workspace import Workspace
from tui.app import create_app

SIZE = (80, 24)


def static_text(widget: Static) -> str:
    return str(widget.render())


async def test_f10_checks_the_edited_rubric_and_shows_verdicts(ws: Workspace):
    write_method_outputs(ws, ("baseline", "sft"))
    before = ws.prompts_path.read_text(encoding="utf-8")
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.focused, TextArea))
        app.prompts.query_one("#rubric", TextArea).text = "Shorter is better."
        await until(pilot, lambda: app.prompts.dirty)
        await pilot.press("f10")
        await until(pilot, lambda: app.running_stage is not None or app.last_final is not None)
        await app.wait_for_stage()
        assert app.last_final is not None and app.last_final.stage == "reward-model"
        assert not getattr(app.last_final, "message", ""), app.last_final
        await until(pilot, lambda: not app.prompts.checking)
        shown = app.prompts.query_one("#try-result", Static)
        text = str(shown.render())
        assert "Judge check of this rubric" in text, text
        assert "judge:" in text
        # the judge's statistics and its accuracy on held-out demonstrations, and in words
        # that this (random) judge cannot be trusted
        assert "decided " in text and "mean position bias" in text, text
        assert "judge prefers your own text: held-out vs base" in text, text
        assert "cannot tell your writing" in text, text
    # the check writes only under results/scratch/: no rm_validation.json of the stage's
    # own, no reward-model run
    assert not ws.result("rm_validation.json").exists()
    assert not list(ws.runs_dir.glob("reward-model*"))
    assert list((ws.results_dir / "scratch" / "runs").glob("reward-model*"))
    data = json.loads((ws.results_dir / "scratch" / "rm_validation.json").read_text("utf-8"))
    demos = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    assert len(data["records"]) == len(demos)
    assert data["summary"]["rubric_sha"] == hashlib.sha256(b"Shorter is better.").hexdigest()[:12]
    assert ws.prompts_path.read_text(encoding="utf-8") == before  # nothing saved
    assert not (ws.results_dir / "checkpoints.toml").exists()  # nothing trained
