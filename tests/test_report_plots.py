"""The report's training plots span resumed runs, as the app's Train tab draws them."""

from __future__ import annotations

import json
from pathlib import Path

from engine.eval.report import resumed_curves


def _run(root: Path, name: str, steps: range, scale: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rows = [{"name": "train/loss", "step": s, "value": scale / s} for s in steps]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_a_resumed_run_plots_the_steps_of_the_run_before_it(tmp_path: Path):
    _run(tmp_path, "sft-20250101-000000", range(1, 12), 3.0)  # killed after step 11
    _run(tmp_path, "rlaif-20250101-120000", range(1, 5), 9.0)  # another stage: not part
    later = _run(tmp_path, "sft-20250102-000000", range(8, 22), 1.0)  # resumed at step 8
    curve = resumed_curves(later)["train/loss"]
    assert [s for s, _ in curve] == list(range(1, 22))
    assert curve[0][1] == 3.0 and curve[7][1] == 1.0 / 8  # earlier steps, then this run's
    first = _run(tmp_path / "alone", "sft-20250101-000000", range(1, 4), 1.0)
    assert [s for s, _ in resumed_curves(first)["train/loss"]] == [1, 2, 3]
