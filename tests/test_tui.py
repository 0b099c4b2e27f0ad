"""The Textual app driven with App.run_test + Pilot on a temporary tiny-model workspace."""

from __future__ import annotations

import json

import pytest
from rich.text import Text
from textual.widgets import DataTable, Static, TextArea
from tui_helpers import until, write_method_outputs, write_past_run, write_synthetic

from engine.run.events import StageFinished
from engine.store.workspace import Workspace
from tui.app import create_app
from tui.common import ConfirmScreen, PairEditScreen
from tui.train import MetricChart

SIZE = (100, 40)


def static_text(widget: Static) -> str:
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)


async def test_edit_demonstration_is_saved(ws: Workspace):
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.focused, DataTable)
        await pilot.press("down", "e")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, PairEditScreen)
        new = "Hi Anita — moved to Mon 3/17. [/b] [red]not markup[/red]\n\n— Maya"
        dialog.query_one("#second", TextArea).text = new
        await pilot.press("ctrl+s")  # keep (the dialog's binding)
        await pilot.pause()
        assert not isinstance(app.screen, PairEditScreen)
        assert app.demos.dirty
        await pilot.press("ctrl+s")  # save the file
        await pilot.pause()
        assert not app.demos.dirty
        saved = json.loads(ws.demos_path.read_text(encoding="utf-8"))
        assert saved[1]["output"] == new.strip()
        # user markup shows as written
        assert "[/b] [red]not markup[/red]" in static_text(
            app.query_one("#demos-detail-output", Static)
        )


async def test_reorder_delete_and_invalid_not_saved(ws: Workspace):
    before = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("right_square_bracket", "ctrl+s")  # move entry 1 down, save
        await pilot.pause()
        saved = json.loads(ws.demos_path.read_text(encoding="utf-8"))
        assert saved[0] == before[1] and saved[1] == before[0]
        for _ in range(len(before) - 2):  # leave 2: fewer than the 3 needed
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.click("#choice-delete")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.demos.dirty
        assert json.loads(ws.demos_path.read_text(encoding="utf-8")) == saved  # unchanged
        assert "at least 3" in static_text(app.query_one("#demos-problems", Static))


async def test_quit_with_unsaved_changes_asks(ws: Workspace):
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#choice-delete")
        await until(pilot, lambda: app.demos.dirty)
        await pilot.press("ctrl+q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")
        await pilot.pause()
        assert app.is_running and app.demos.dirty
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#choice-save")
        await pilot.pause()
    assert len(json.loads(ws.demos_path.read_text(encoding="utf-8"))) == 9


async def test_markup_in_user_text_is_literal(ws: Workspace):
    demos = [
        {"input": f"Request [/b] number {i} [red]x[/red]", "output": f"Text [bold]{i}[/] [/x]"}
        for i in range(3)
    ]
    ws.demos_path.write_text(json.dumps(demos), encoding="utf-8")
    write_synthetic(ws, 3)
    write_method_outputs(ws)
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        for key in ("f1", "f2", "f3", "f4", "f5", "b"):
            await pilot.press(key)
            await pilot.pause()
        assert "[/b]" in static_text(app.query_one("#blind-request", Static))


async def test_synthetic_accept_reject_edit_saved(ws: Workspace):
    path = write_synthetic(ws, 6)
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        assert app.focused is app.query_one("#synth-table")
        await pilot.press("a", "r", "a")  # rows 1..3; the cursor moves down after each
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, PairEditScreen)
        app.screen.query_one("#second", TextArea).text = "Hi Sam — Thu works. — Maya"
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.press("ctrl+s")  # flush now (it also saves on its own a moment later)
        await pilot.pause()
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert [r["status"] for r in rows] == [
            "accepted",
            "rejected",
            "accepted",
            "edited",
            "pending",
            "pending",
        ]
        assert rows[3]["messages"][-1]["content"] == "Hi Sam — Thu works. — Maya"
        # filter to pending, accept all shown
        await pilot.press("f", "A")

        def statuses() -> list[str]:
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line)["status"] for line in lines]

        await until(pilot, lambda: statuses()[4:] == ["accepted", "accepted"])  # the autosave
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows[1]["status"] == "rejected"
        assert "showing 0 of 6" in static_text(app.query_one("#synth-status", Static))


async def test_synthetic_5000_rows_review_and_filter(ws: Workspace):
    """Review keys and the status filter on 5,000 rows (timings live in bench/, not here)."""
    write_synthetic(ws, 5000)
    app = create_app(ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("a", "r", "down", "down", "a")
        await pilot.pause()
        await pilot.press("f")  # filter to pending: rebuilds the table
        await pilot.pause()
        assert "showing 4997 of 5000" in static_text(app.query_one("#synth-status", Static))
        await pilot.press("ctrl+s")
        await pilot.pause()
    path = ws.result("synthetic_personalized_data.jsonl")
    statuses = [
        json.loads(line)["status"] for line in path.read_text(encoding="utf-8").splitlines()
    ]
    assert len(statuses) == 5000
    assert sorted(s for s in statuses if s != "pending") == ["accepted", "accepted", "rejected"]


async def test_blind_ab_picks_saved(ws: Workspace):
    write_method_outputs(ws)
    app = create_app(ws, compare_seed=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5", "b")
        await pilot.pause()
        shown = []
        for key in ("1", "2", "t"):
            shown.append(app.compare.pair)
            await pilot.press(key)
            await pilot.pause()
    lines = ws.result("human_preferences.jsonl").read_text(encoding="utf-8").splitlines()
    prefs = [json.loads(x) for x in lines]
    assert len(prefs) == 3
    assert [p["choice"] for p in prefs] == ["a", "b", "tie"]
    for p, (request, a, b) in zip(prefs, shown, strict=True):
        assert (p["input"], p["a"], p["b"]) == (request, a, b)
        assert {p["a"], p["b"]} <= {"baseline", "prompting", "sft"} and p["a"] != p["b"]
    assert prefs[0]["winner"] == prefs[0]["a"] and prefs[1]["winner"] == prefs[1]["b"]
    assert prefs[2]["winner"] == "tie"


async def test_replay_past_run_into_charts(ws: Workspace):
    write_past_run(ws, "sft", steps=5)
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        await pilot.pause()
        table = app.query_one("#stage-table", DataTable)
        table.move_cursor(
            row=list(app.train.statuses).index(
                next(s for s in app.train.statuses if s.name == "sft")
            )
        )
        await pilot.press("r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.query_one("#loss-chart", MetricChart).points == 10
        assert app.query_one("#metric-chart", MetricChart).points == 1
        assert app.query_one("#metric-chart").display


async def test_command_palette_lists_bindings(ws: Workspace):
    write_synthetic(ws, 3)
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        for want in ("Accept (a)", "Reject (r)", "Train (f4)", "Save (ctrl+s)", "Light/dark (f9)"):
            assert want in commands, list(commands)
        app.call_later(commands["Reject (r)"].callback)  # as the palette runs it
        await pilot.pause()
        assert app.synthetic.rows[0]["status"] == "rejected"
        await pilot.press("f9")
        assert app.theme == "textual-light"


async def test_launch_sft_on_tiny_model(ws: Workspace):
    pytest.importorskip("engine.backends.local")
    write_synthetic(ws, 8, status="accepted")
    app = create_app(
        ws, overrides=["sft.sample_after=false", "sft.steps=3", "sft.checkpoint_every=0"]
    )
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f4")
        await pilot.pause()
        names = [s.name for s in app.train.statuses]
        app.query_one("#stage-table", DataTable).move_cursor(row=names.index("sft"))
        await pilot.press("enter")
        await pilot.pause()
        final = await app.wait_for_stage()  # 3 tiny steps may already be done
        chart = app.query_one("#loss-chart", MetricChart)
        await until(
            pilot,
            lambda: app.running_stage is None and len(chart.series.get("train/loss", [])) == 3,
        )
        assert isinstance(final, StageFinished), final
        assert final.stage == "sft" and app.running_stage is None
        chart = app.query_one("#loss-chart", MetricChart)
        assert len(chart.series.get("train/loss", [])) == 3
        table = app.query_one("#stage-table", DataTable)
        await until(pilot, lambda: table.get_cell("sft", "state").plain == "done")
        assert isinstance(table.get_cell("sft", "state"), Text)


async def test_prompts_saved_and_try_it(ws: Workspace):
    """Edit the system prompt and 'try it' (f8) through a fake prompting stage: the try uses
    the unsaved prompt, writes to results/scratch/ only, and saves nothing; ctrl+s saves."""
    from dataclasses import dataclass
    from typing import Any

    from engine.pipeline.runner import Runner
    from engine.run.events import LogLine
    from engine.store.atomic import atomic_write_json

    @dataclass(frozen=True)
    class Spec:
        run: Any
        trains: bool = False

    async def fake_prompting(ctx):
        demos = ctx.workspace.load_demos()
        prompt = ctx.workspace.load_prompts()["system_prompt"]
        yield LogLine("fake prompting")
        rows = [
            {"input": d["input"], "expected_output": d["output"], "output": f"[{prompt}] for #{i}"}
            for i, d in enumerate(demos)
        ]
        atomic_write_json(ctx.workspace.result("prompt_engineering_results.json"), rows)
        yield StageFinished(stage=ctx.stage, outputs=("prompt_engineering_results.json",))

    before = ws.prompts_path.read_text(encoding="utf-8")
    runner = Runner(ws, stages={"prompting": Spec(fake_prompting)})
    app = create_app(ws, runner=runner)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.focused, TextArea))
        app.focused.text = "Write like Maya [/b]."
        await until(pilot, lambda: app.prompts.dirty)
        await pilot.press("f8")  # runs the stage on the edited prompt, saves nothing
        await until(pilot, lambda: app.running_stage is not None or app.last_final is not None)
        await app.wait_for_stage()
        await until(pilot, lambda: not app.prompts.trying)
        shown = static_text(app.query_one("#try-result", Static))
        assert "[Write like Maya [/b].] for #0" in shown
        assert ws.prompts_path.read_text(encoding="utf-8") == before
        assert not ws.result("prompt_engineering_results.json").exists()
        assert ws.result("scratch/prompt_engineering_results.json").exists()
        assert app.prompts.dirty
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.prompts.dirty)
    import tomllib

    saved = tomllib.loads(ws.prompts_path.read_text(encoding="utf-8"))
    assert saved["system_prompt"] == "Write like Maya [/b]."
    assert saved["seeds"]


async def test_review_merges_with_a_file_rewritten_underneath(ws: Workspace):
    """A stage (or another terminal) rewrites the synthetic file while a review is unsaved:
    the save applies the reviewed row to the new file instead of writing stale rows over it."""
    path = write_synthetic(ws, 4)
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("a")  # row 0 accepted; the autosave is still pending
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        rows[1]["messages"][-1]["content"] = "regenerated by the stage"
        rows.append({**rows[0], "id": "new-row", "status": "pending"})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        await pilot.press("ctrl+s")
        await pilot.pause()
    saved = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["status"] for r in saved] == ["accepted", "pending", "pending", "pending", "pending"]
    assert saved[1]["messages"][-1]["content"] == "regenerated by the stage"
    assert saved[-1]["id"] == "new-row"


async def test_quit_while_training_saves_a_checkpoint_first(ws: Workspace):
    import tomllib

    write_synthetic(ws, 8, status="accepted")
    app = create_app(
        ws, overrides=["sft.sample_after=false", "sft.steps=500", "sft.checkpoint_every=0"]
    )
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        assert app.launch_stage("sft")
        chart = app.query_one("#loss-chart", MetricChart)
        await until(pilot, lambda: bool(chart.series.get("train/loss")))  # training under way
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#choice-discard")
        await app.wait_for_stage()
        await pilot.pause()
    entry = tomllib.loads(ws.result("checkpoints.toml").read_text(encoding="utf-8"))["sft"]
    assert not entry["finished"] and 0 < entry["step"] < 500


def test_compare_matches_demos_written_with_spaces(ws: Workspace):
    from tui.compare import load_outputs

    write_method_outputs(ws, methods=("baseline",))  # the stages record trimmed inputs
    demos = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    demos[0]["input"] = f"  {demos[0]['input']}\n"
    ws.demos_path.write_text(json.dumps(demos), encoding="utf-8")
    requests, outputs = load_outputs(ws)
    assert len(requests) == len(demos) and {r["kind"] for r in requests} == {"demo"}
    assert requests[0]["input"] in outputs["baseline"]
