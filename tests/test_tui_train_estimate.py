"""The Train tab shows the selected stage's estimated time before launch."""

from __future__ import annotations

from conftest import TINY, hand_profile, needs_backend
from textual.widgets import DataTable, Input, Static
from tui_helpers import until, write_synthetic

from engine.store.workspace import Workspace
from tui.app import create_app

pytestmark = needs_backend
SIZE = (100, 40)


def save_slow_profile(sp, ws: Workspace):
    """A hand-made profile for the tiny model on this machine: slow, round rates."""
    cfg = ws.config()
    key = sp.current_key(TINY, threads=cfg.local.threads, dtype=cfg.local.dtype)
    sp.save_profile(
        hand_profile(
            key,
            prefill_tokens_per_s=100.0,
            train_tokens_per_s=10.0,
            decode_tokens_per_s={1: 2.0, 8: 8.0, 32: 16.0},
            request_s=0.1,
            prompt_tokens_per_s=100.0,
            load_s=3.0,
            checkpoint_s=0.5,
        )
    )
    return key


def line_text(app) -> str:
    content = app.query_one("#stage-estimate", Static).content
    return content.plain if hasattr(content, "plain") else str(content)


async def select(app, pilot, stage: str) -> None:
    names = [s.name for s in app.train.statuses]
    app.query_one("#stage-table", DataTable).move_cursor(row=names.index(stage))
    await pilot.pause()


async def open_at(app, pilot, stage: str):
    """The Train tab with ``stage`` selected and its estimate shown; the Train pane."""
    await app.wait_ready()
    await pilot.press("f4")
    await select(app, pilot, stage)
    await until(pilot, lambda: app.train.estimate.estimate_for == (stage, ""))
    return app.train.estimate


async def test_the_selected_stage_shows_its_estimate(ws: Workspace, sp):
    key = save_slow_profile(sp, ws)
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        train = await open_at(app, pilot, "baseline")
        text = train.estimate_text
        dtype = "bf16" if key.dtype == "bfloat16" else "fp32"
        threads = f"{key.threads} thread{'s' if key.threads != 1 else ''}"
        assert text.startswith("≤ ") and f"on this machine ({dtype}, {threads})" in text
        assert "sampling" in text
        assert line_text(app) == text
        assert app.query_one("#stage-estimate", Static).display
        await select(app, pilot, "demos")
        await until(pilot, lambda: train.estimate_for == ("demos", ""))
        assert train.estimate_text.startswith("no model")


async def test_an_override_typed_changes_the_estimate(ws: Workspace, sp):
    save_slow_profile(sp, ws)
    write_synthetic(ws, 12)
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        train = await open_at(app, pilot, "sft")
        before = train.estimate_text
        assert "training" in before
        overrides = app.query_one("#overrides", Input)
        await pilot.press("o")
        await until(pilot, lambda: overrides.has_focus)
        for ch in "sft.steps=200":
            await pilot.press(ch)
        await until(pilot, lambda: train.estimate_for == ("sft", "sft.steps=200"))
        after = train.estimate_text
        assert after != before and "training" in after
        assert line_text(app) == after
        # a typo in an override says so instead of an estimate
        await pilot.press("x")
        await until(pilot, lambda: train.estimate_for == ("sft", "sft.steps=200x"))
        assert train.estimate_text.startswith("no estimate")
        overrides.value = "backend.name=tinker"
        await until(pilot, lambda: train.estimate_for == ("sft", "backend.name=tinker"))
        assert "runs on Tinker" in train.estimate_text


async def test_speed_is_measured_once_when_no_profile_is_cached(ws: Workspace, sp, monkeypatch):
    import tui.train_estimate

    monkeypatch.setattr(
        tui.train_estimate, "NO_AUTO_MEASURE", frozenset()
    )  # measure the tiny model
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        train = app.train.estimate
        await pilot.pause()
        assert train.speed_state == ""  # the tab has not been shown: nothing measured
        await pilot.press("f4")
        await select(app, pilot, "baseline")
        await until(pilot, lambda: train.speed_state != "")
        await until(pilot, lambda: train.speed_state == "measured")
        await until(
            pilot,
            lambda: (
                train.estimate_for == ("baseline", "") and "on this machine" in train.estimate_text
            ),
        )
        profiles = list(sp.speed_dir().glob("profile-*.json"))
        assert len(profiles) == 1
        # another stage now reads the cached profile: no second measurement
        await select(app, pilot, "synth-inputs")
        await until(pilot, lambda: train.estimate_for == ("synth-inputs", ""))
        assert "on this machine" in train.estimate_text
        assert train.speed_state == "measured"
        assert list(sp.speed_dir().glob("profile-*.json")) == profiles


async def test_no_measuring_while_a_stage_runs(ws: Workspace, sp, monkeypatch):
    import tui.train_estimate

    monkeypatch.setattr(tui.train_estimate, "NO_AUTO_MEASURE", frozenset())
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_ready()
        app.running_stage = "baseline"  # as the app marks a stage it runs
        await pilot.press("f4")
        await select(app, pilot, "sft")
        train = app.train.estimate
        await until(pilot, lambda: train.estimate_for == ("sft", ""))
        assert "measured once nothing runs" in train.estimate_text
        assert train.speed_state == ""
        assert not sp.speed_dir().exists() or not list(sp.speed_dir().iterdir())
        app.running_stage = None


async def test_the_tests_model_is_not_measured_automatically(ws: Workspace, sp):
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        train = await open_at(app, pilot, "baseline")
        assert train.estimate_text == "" and train.speed_state == ""
        assert not app.query_one("#stage-estimate", Static).display


async def test_accepting_rows_estimates_sft_again_without_a_cursor_move(ws: Workspace, sp):
    """The estimate follows the inputs: rows accepted in the Synthetic tab (saved) change
    sft's estimate on the Train tab with the cursor where it was."""
    from tui_helpers import synthetic_rows

    from engine.store.atomic import atomic_write_jsonl

    save_slow_profile(sp, ws)
    rows = synthetic_rows(30)
    for r in rows[:2]:
        r["status"] = "accepted"
    atomic_write_jsonl(ws.result("synthetic_personalized_data.jsonl"), rows)
    app = create_app(ws, overrides=["sft.steps=0", "sft.train_on=reviewed"])  # rows count
    async with app.run_test(size=SIZE) as pilot:
        estimate = await open_at(app, pilot, "sft")
        before = estimate.estimate_text
        assert "training" in before
        await pilot.press("f3")
        await until(pilot, lambda: app.focused is app.query_one("#synth-table"))
        await pilot.press("A", "ctrl+s")
        await pilot.press("f4")
        await until(pilot, lambda: estimate.estimate_text != before)
        assert "training" in estimate.estimate_text and estimate.estimate_for == ("sft", "")
