"""The Prompts & Rubric tab: saving data/prompts.toml and trying the prompt (f8).

Pilot tests on a temporary tiny-model workspace; each waits for a state
(tui_helpers.until), never for time."""

from __future__ import annotations

from textual.widgets import Static, TextArea
from tui_helpers import until

from engine.run.events import LogLine, StageFinished
from engine.store.workspace import Workspace
from tui.app import create_app

SIZE = (80, 24)
WIDE = (100, 40)  # tests written for a larger terminal


def text_of(widget: Static) -> str:
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)


async def test_prompts_saved_and_try_it(ws: Workspace):
    """Edit the system prompt and 'try it' (f8) through a fake prompting stage: the try uses
    the unsaved prompt, writes to results/scratch/ only, and saves nothing; ctrl+s saves."""
    from dataclasses import dataclass
    from typing import Any

    from engine.pipeline.runner import Runner
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
    async with app.run_test(size=WIDE) as pilot:
        await app.wait_ready()
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.focused, TextArea))
        app.focused.text = "Write like Maya [/b]."
        await until(pilot, lambda: app.prompts.dirty)
        await pilot.press("f8")  # runs the stage on the edited prompt, saves nothing
        await until(pilot, lambda: app.running_stage is not None or app.last_final is not None)
        await app.wait_for_stage()
        await until(pilot, lambda: not app.prompts.trying)
        shown = text_of(app.query_one("#try-result", Static))
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


async def test_prompts_file_keeps_header_and_multiline_strings(ws: Workspace):
    """Saving from the app keeps the explanation and writes multi-line strings as such."""
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.focused is app.query_one("#system-prompt"))
        app.focused.text = "Line one.\nLine two."
        await until(pilot, lambda: app.prompts.dirty)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.prompts.dirty)
    text = ws.prompts_path.read_text(encoding="utf-8")
    assert text.startswith("# Persona prompts")
    assert 'system_prompt = """\nLine one.\nLine two."""' in text


async def test_saving_keeps_quotes_and_blank_lines_as_written(ws: Workspace):
    """A saved prompts.toml reads as the person wrote it: quotes unescaped, blank lines kept
    (between entries and inside texts), and it loads back to the same values."""
    import tomllib

    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.focused is app.query_one("#system-prompt"))
        app.focused.text = 'Open with "Hi <name> —".\n\nEnd with "Thanks!"'
        await until(pilot, lambda: app.prompts.dirty)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.prompts.dirty)
    text = ws.prompts_path.read_text(encoding="utf-8")
    assert text.count('\\"') == 1  # only the quote right before the closing """
    assert 'system_prompt = """\nOpen with "Hi <name> —".\n\nEnd with "Thanks!\\""""' in text
    assert '"""\n\nrubric = """' in text and '"""\n\nseeds = [' in text
    assert "\n\n[templates]\n" in text and '"""\n\ncritique = """' in text
    data = tomllib.loads(text)
    assert data["system_prompt"] == 'Open with "Hi <name> —".\n\nEnd with "Thanks!"'
    assert data["rubric"].count('"Hi <name> —"') == 1
