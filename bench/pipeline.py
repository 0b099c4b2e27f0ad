"""Benchmark: baseline -> prompting -> synth-inputs -> synth-outputs -> sft on the real default
model (SmolLM2-135M-Instruct, local backend) with the example data in a temporary workspace.

    .venv/bin/python bench/pipeline.py [--keep DIR] [--set section.key=value ...]

Progress goes to stderr; the last stdout line is one JSON object: each stage's wall seconds,
the synth-inputs yield, and SFT train/validation loss at start and end. The budgets below are
chosen so the chain fits in 15 minutes on a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.events import LogLine, Metric, StageFailed, StageFinished  # noqa: E402
from engine.runner import Runner  # noqa: E402
from engine.workspace import init_workspace  # noqa: E402

CHAIN = ["baseline", "prompting", "synth-inputs", "synth-outputs", "sft"]
BUDGET = [
    "sampling.max_tokens=120",
    "synth_inputs.max_seeds=5",
    "synth_inputs.per_seed=4",
    "synth_inputs.max_tokens=200",
    "synth_inputs.retries=1",
    "synth_outputs.max_tokens=150",
    "synth_outputs.limit=12",
    "sft.steps=12",
    "sft.batch_size=4",
    "sft.eval_every=2",
    "sft.checkpoint_every=6",
    "sft.max_length=512",
]


async def bench(root: Path, extra: list[str]) -> dict:
    ws = init_workspace(root)
    overrides = BUDGET + extra
    result: dict = {"model": None, "backend": "local", "stages": {}, "overrides": overrides}
    metrics: dict[str, list[tuple[int, float]]] = {}
    t_all = time.perf_counter()
    for stage in CHAIN:
        t0 = time.perf_counter()
        final = None
        async for ev in Runner(ws).run_stage(stage, overrides):
            if isinstance(ev, Metric):
                metrics.setdefault(ev.name, []).append((ev.step, ev.value))
            elif isinstance(ev, LogLine) and ev.level != "info":
                print(f"  [{stage}] {ev.message.splitlines()[-1]}", file=sys.stderr)
            final = ev
        secs = round(time.perf_counter() - t0, 1)
        result["stages"][stage] = secs
        if isinstance(final, StageFailed):
            print(f"{stage} FAILED after {secs}s: {final.message}", file=sys.stderr)
            result["failed"] = {"stage": stage, "message": final.message}
            break
        assert isinstance(final, StageFinished)
        print(f"{stage}: {secs}s  {final.summary}", file=sys.stderr)
        if stage == "synth-inputs":
            m = re.search(r"yield (\d+)/(\d+)", final.summary)
            if m:
                result["synth_inputs_yield"] = round(int(m.group(1)) / int(m.group(2)), 3)
                result["synth_inputs_valid"], result["synth_inputs_asked"] = (
                    int(m.group(1)),
                    int(m.group(2)),
                )
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    train, val = sorted(metrics.get("train/loss", [])), sorted(metrics.get("val/loss", []))
    if train:
        result["sft"] = {
            "steps": train[-1][0],
            "train_loss_start": round(train[0][1], 4),
            "train_loss_end": round(train[-1][1], 4),
            "val_loss_start": round(val[0][1], 4) if val else None,
            "val_loss_end": round(val[-1][1], 4) if val else None,
        }
    result["model"] = ws.config(overrides).model("policy")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", help="use (and keep) this workspace folder instead of a temporary one")
    p.add_argument("--set", dest="extra", action="append", default=[])
    args = p.parse_args()
    if args.keep:
        result = asyncio.run(bench(Path(args.keep), args.extra))
    else:
        with tempfile.TemporaryDirectory(prefix="persona-bench-") as d:
            result = asyncio.run(bench(Path(d) / "ws", args.extra))
    print(json.dumps(result))
    return 1 if "failed" in result else 0


if __name__ == "__main__":
    sys.exit(main())
