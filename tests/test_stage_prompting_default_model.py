"""One check on the real default model (SmolLM2-135M-Instruct): prompting writes sensible text."""

from __future__ import annotations

import json

import pytest
from conftest import needs_backend

from engine.pipeline.runner import Runner
from engine.run.events import StageFinished
from engine.store.workspace import Workspace, init_workspace

pytestmark = [needs_backend, pytest.mark.slow]


async def test_prompting_on_default_model(tmp_path):
    ws: Workspace = init_workspace(tmp_path / "ws")
    ws.save_demos(ws.load_demos()[:3])
    final = await Runner(ws).run(
        "prompting", ["sampling.max_tokens=40", "sampling.temperature=0.7"]
    )
    assert isinstance(final, StageFinished), final
    rows = json.loads(ws.result("prompt_engineering_results.json").read_text())
    assert len(rows) == 3
    for r in rows:
        words = r["output"].split()
        assert len(words) >= 5  # real English words, not nothing
        assert "<|im_end|>" not in r["output"] and "<|im_start|>" not in r["output"]
        assert sum(w.isalpha() for w in words) / len(words) > 0.5
