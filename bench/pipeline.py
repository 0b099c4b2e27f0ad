"""Benchmark: every stage, baseline -> ... -> evaluate, on the real default model
(SmolLM2-135M-Instruct, local backend) with the example data in a temporary workspace.

    .venv/bin/python bench/pipeline.py [--defaults] [--stages a,b] [--keep DIR] [--set k=v ...]

Progress goes to stderr; the last stdout line is one JSON object: the CPU path (device, dtype),
each stage's wall seconds and peak resident memory, the synth-inputs yield, and SFT
train/validation loss at start and end. Without ``--defaults`` the reduced budget below
keeps the chain to minutes on a 2-core CPU; with it every stage runs at the local defaults
(README's cost table gives both).
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

from engine.pipeline.runner import Runner  # noqa: E402
from engine.run.events import LogLine, Metric, StageFailed, StageFinished  # noqa: E402
from engine.stages import STAGES  # noqa: E402
from engine.store.workspace import init_workspace  # noqa: E402

CHAIN = [name for name in STAGES if name != "demos"]  # every stage that runs a model
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
    "reward_model.steps=6",
    "rl_prompts.teacher_calls=4",
    "rl_prompts.dev_size=4",
    "rlaif.steps=2",
    "rlaif.batch_size=2",
    "rlaif.eval_every=2",
    "rlaif.dev_prompts=2",
    "ditto.rounds=2",
    "ditto.steps_per_round=2",
    "ditto.sft_max_steps=6",
    "evaluate.samples=1",
    "evaluate.dev_prompts=2",
]


def _reset_peak_rss() -> bool:
    """Start this process's resident-memory high-water mark again (Linux; False elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> int | None:
    """The high-water mark since the last reset, from /proc/self/status (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


async def bench(root: Path, extra: list[str], defaults: bool, chain: list[str]) -> dict:
    from engine.backends import describe_compute

    ws = init_workspace(root)
    overrides = ([] if defaults else BUDGET) + extra
    result: dict = {
        "model": None,
        **describe_compute(ws.config(overrides)),
        "budget": "defaults" if defaults else "reduced",
        "stages": {},
        "peak_rss_mb": {},
        "overrides": overrides,
    }
    metrics: dict[str, list[tuple[int, float]]] = {}
    t_all = time.perf_counter()
    for stage in chain:
        t0 = time.perf_counter()
        result["peak_rss_per_stage"] = _reset_peak_rss()
        final = None
        async for ev in Runner(ws).run_stage(stage, overrides):
            if isinstance(ev, Metric):
                metrics.setdefault(ev.name, []).append((ev.step, ev.value))
            elif isinstance(ev, LogLine) and ev.level != "info":
                print(f"  [{stage}] {ev.message.splitlines()[-1]}", file=sys.stderr)
            final = ev
        secs = round(time.perf_counter() - t0, 1)
        result["stages"][stage] = secs
        # Without a reset the mark is the whole run's so far (still a true upper bound).
        result["peak_rss_mb"][stage] = _peak_rss_mb()
        if isinstance(final, StageFailed):
            print(f"{stage} FAILED after {secs}s: {final.message}", file=sys.stderr)
            result["failed"] = {"stage": stage, "message": final.message}
            break
        assert isinstance(final, StageFinished)
        print(
            f"{stage}: {secs}s, peak {result['peak_rss_mb'][stage]} MB  {final.summary}",
            file=sys.stderr,
        )
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
    p.add_argument("--defaults", action="store_true", help="every stage at the local defaults")
    p.add_argument("--stages", default=",".join(CHAIN), help="comma-separated stages, in order")
    args = p.parse_args()
    chain = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.keep:
        result = asyncio.run(bench(Path(args.keep), args.extra, args.defaults, chain))
    else:
        with tempfile.TemporaryDirectory(prefix="persona-bench-") as d:
            result = asyncio.run(bench(Path(d) / "ws", args.extra, args.defaults, chain))
    print(json.dumps(result))
    return 1 if "failed" in result else 0


if __name__ == "__main__":
    sys.exit(main())
