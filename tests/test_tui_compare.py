"""The Compare tab: side by side and blind A/B (the report view: test_tui_report.py).

Pilot tests on a temporary tiny-model workspace; each waits for a state
(tui_helpers.until), never for time."""

from __future__ import annotations

import json

from textual.widgets import Static
from tui_helpers import until, write_method_outputs

from engine.store.workspace import Workspace
from tui.app import create_app

SIZE = (80, 24)
WIDE = (100, 40)  # tests written for a larger terminal


def text_of(widget: Static) -> str:
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)


async def test_blind_ab_picks_saved(ws: Workspace):
    write_method_outputs(ws)
    app = create_app(ws, compare_seed=1)
    async with app.run_test(size=WIDE) as pilot:
        await pilot.press("f5", "b")
        await pilot.pause()
        shown = []
        for key in ("1", "2", "t"):
            shown.append(app.compare.blind.pair)
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


def test_compare_matches_demos_written_with_spaces(ws: Workspace):
    from tui.compare import load_outputs

    write_method_outputs(ws, methods=("baseline",))  # the stages record trimmed inputs
    demos = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    demos[0]["input"] = f"  {demos[0]['input']}\n"
    ws.demos_path.write_text(json.dumps(demos), encoding="utf-8")
    requests, outputs = load_outputs(ws)
    assert len(requests) == len(demos) and {r["kind"] for r in requests} == {"demo"}
    assert requests[0]["input"] in outputs["baseline"]


async def test_blind_ab_each_pair_once_undo_skip_and_the_end(ws: Workspace):
    """Pairs from every method, each once; u undoes; n skips; the end says so."""
    write_method_outputs(ws, methods=("baseline", "prompting", "sft"))
    demos = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    total = 3 * len(demos)
    app = create_app(ws, compare_seed=3)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5", "b")
        cmp = app.compare.blind
        await until(pilot, lambda: cmp.pair is not None)
        first = cmp.pair
        await pilot.press("n")
        assert cmp.pair != first
        picked = cmp.pair
        await pilot.press("1")
        assert cmp.pair != picked
        await pilot.press("u")  # undo: the same pair again, the pick gone
        assert cmp.pair == picked
        assert not ws.result("human_preferences.jsonl").read_text(encoding="utf-8").strip()
        seen = set()
        for _ in range(total):
            request, a, b = cmp.pair
            key = (request, frozenset((a, b)))
            assert key not in seen
            seen.add(key)
            await pilot.press("t")
        assert cmp.pair is None and len(seen) == total
        assert "No more pairs" in text_of(app.query_one("#blind-request", Static))
        assert {m for k in seen for m in k[1]} == {"baseline", "prompting", "sft"}
    prefs = ws.result("human_preferences.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(prefs) == total


async def test_side_by_side_shows_each_method_beside_your_text_at_80x24(ws: Workspace):
    """Every method's answer can be read next to the person's text at 80x24: "Your text" and
    one method side by side, ←/→ step through the methods, the title names the method and its
    place; a wide terminal shows more methods at once. The palette shows no internal names."""
    write_method_outputs(ws, methods=("baseline", "prompting", "sft"))
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await until(pilot, lambda: len(app.query(".side-col")) == 2)

        def shown() -> list[str]:
            return [
                " ".join(text_of(s) for s in col.query(Static)) for col in app.query(".side-col")
            ]

        cols = list(app.query(".side-col"))
        assert cols[0].region.x < cols[1].region.x  # beside each other, not stacked
        assert all(c.region.right <= 80 and c.region.width >= 20 for c in cols)  # on screen
        demos = json.loads(ws.demos_path.read_text(encoding="utf-8"))
        seen = []
        for _ in range(3):
            your, method = shown()
            assert your.startswith("Your text") and demos[0]["output"][:20] in your
            name = method.split()[0]
            assert f"{name}  " in method and "/3" in method
            assert f"{name} says hi to #0" in method.replace("[bold]", "").replace("[/]", "")
            seen.append(name)
            await pilot.press("right")
            await until(pilot, lambda n=name: shown() and shown()[1].split()[0] != n)
        assert sorted(seen) == ["baseline", "prompting", "sft"]
        await pilot.press("left")
        await until(pilot, lambda: shown()[1].split()[0] == seen[-1])
        await pilot.resize_terminal(160, 40)
        await until(pilot, lambda: len(app.query(".side-col")) == 4)  # your text + 3 methods
        commands = list(app.get_system_commands(app.screen))
        assert not [c for c in commands if "(show_tab" in c.help or "action (" in c.help]
        assert sum("theme" in c.title.lower() for c in commands) <= 1


async def test_a_fixed_data_file_reread_with_ctrl_l_clears_the_problem(ws: Workspace):
    """data/data.json broken, then fixed in an editor and re-read (ctrl+l on Demos, or on
    Compare): Compare shows the demonstrations again and no longer names the problem."""
    good = ws.demos_path.read_text(encoding="utf-8")
    ws.demos_path.write_text(good[:-20], encoding="utf-8")
    app = create_app(ws)
    async with app.run_test(size=SIZE) as pilot:
        status = app.query_one("#compare-status", Static)
        await until(pilot, lambda: "data/data.json" in text_of(status))
        ws.demos_path.write_text(good, encoding="utf-8")
        await pilot.press("f1", "ctrl+l")
        await until(pilot, lambda: "data/data.json" not in text_of(status))
        assert f"{len(json.loads(good))} requests" in text_of(status)
        ws.demos_path.write_text(good[:-20], encoding="utf-8")
        await pilot.press("f5", "ctrl+l")
        await until(pilot, lambda: "data/data.json" in text_of(status))
