"""The prompting stage on some demonstrations only ("try it" in the Prompts tab)."""

from __future__ import annotations

import json

from conftest import needs_backend

from engine.pipeline.runner import Runner
from engine.run.events import StageFailed, StageFinished

pytestmark = needs_backend

SMALL = ["sampling.max_tokens=8"]


async def test_only_some_demos_keeps_the_other_rows(ws):
    demos = ws.load_demos()
    out = ws.result("prompt_engineering_results.json")
    assert isinstance(
        await Runner(ws).run("prompting", [*SMALL, "prompting.only=[1]"]), StageFinished
    )
    rows = json.loads(out.read_text())
    assert [r["input"] for r in rows] == [demos[1]["input"]]
    assert rows[0]["expected_output"] == demos[1]["output"]

    # A full run, then one demo again: the other rows stay as they were, in demo order.
    await Runner(ws).run("prompting", SMALL)
    before = json.loads(out.read_text())
    marked = [dict(r, output=f"earlier #{i}") for i, r in enumerate(before)]
    out.write_text(json.dumps(marked))
    final = await Runner(ws).run("prompting", [*SMALL, "prompting.only=[2]"])
    assert isinstance(final, StageFinished) and final.summary.startswith("1 outputs")
    after = json.loads(out.read_text())
    assert [r["input"] for r in after] == [d["input"] for d in demos]
    assert [r["output"] for i, r in enumerate(after) if i != 2] == [
        f"earlier #{i}" for i in range(len(demos)) if i != 2
    ]
    assert after[2]["output"] != "earlier #2"


async def test_only_names_a_missing_demo(ws):
    count = len(ws.load_demos())
    final = await Runner(ws).run("prompting", [*SMALL, f"prompting.only=[{count}]"])
    assert isinstance(final, StageFailed)
    assert f"demonstration {count} does not exist" in final.message
    assert not ws.result("prompt_engineering_results.json").exists()
