"""A deleted checkpoint folder said "No local checkpoint at ... (expected
.../persona_checkpoint.json)" with no hint; it names the stage to rerun."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import needs_backend

pytestmark = needs_backend


@pytest.mark.parametrize("stage", ["sft", "reward-model", "rlaif", "ditto"])
def test_the_message_names_the_stage_to_rerun(tmp_path: Path, stage: str):
    from engine.backends.local.checkpoint_io import CheckpointNotFoundError, resolve

    run = tmp_path / "ws" / "runs" / f"{stage}-20250101-120000"
    gone = run / "checkpoints" / "m" / "weights" / "final"
    with pytest.raises(CheckpointNotFoundError) as e:
        resolve(f"local://{gone}")
    msg = str(e.value)
    assert msg.startswith(f"No local checkpoint at local://{gone}")
    assert f"runs/{stage}-20250101-120000" in msg and f"`persona run {stage}`" in msg


def test_a_folder_outside_a_run_still_says_what_to_do(tmp_path: Path):
    from engine.backends.local.checkpoint_io import CheckpointNotFoundError, resolve

    with pytest.raises(CheckpointNotFoundError, match="rerun the stage that made it"):
        resolve(str(tmp_path / "elsewhere"))
