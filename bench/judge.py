"""Benchmark: does the judge's verdict mean something? On the example data with the default
model (SmolLM2-135M-Instruct, local backend), in a temporary workspace.

    .venv/bin/python bench/judge.py [--keep DIR] [--stages baseline,prompting] [--set k=v ...]

Setup: the stages in ``--stages`` sample the policy on every demonstration (their samples on
the training demonstrations are the judge's training pairs: the person's text preferred),
then the reward-model stage trains the judge at the local defaults (or ``--set``) and
measures the base and the trained judge on the held-out demonstrations: the person's text
against the base and the few-shot samples for the same request (the person's should win),
and on the pairs it trained on ("seen in training").

Progress goes to stderr; the last stdout line is one JSON object whose keys stay the same
over time, so runs can be compared: ``accuracy`` -> ``base`` / ``trained`` -> ``vs_base`` /
``vs_few_shot`` / ``seen_in_training`` -> ``{value, n, ci}``; ``position_bias_nats``;
``decided_share`` -> ``calibrated`` / ``agreement``; ``seconds_per_comparison`` (all three of
the trained judge, on the accuracy comparisons); ``tie_margin_sweep`` -> ``base`` / ``trained``
-> one row per tie margin (decided share and held-out accuracy, from the same verdicts' kept
margins), plus the setup, timings and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.evaluate import machine  # noqa: E402
from engine.eval.judge_trust import tie_margin_sweep  # noqa: E402
from engine.pipeline.runner import Runner  # noqa: E402
from engine.run.events import LogLine, StageFailed, StageFinished  # noqa: E402
from engine.store.results import read_rm_validation  # noqa: E402
from engine.store.workspace import init_workspace  # noqa: E402

KEYS = ("vs_base", "vs_few_shot", "seen_in_training")


async def run_stage(ws, name: str, extra: list[str]) -> float:
    t0 = time.time()
    final = None
    async for ev in Runner(ws).run_stage(name, extra):
        if isinstance(ev, LogLine):
            print(f"[{name} {time.time() - t0:6.0f}s] {ev.message}", file=sys.stderr)
        if isinstance(ev, StageFinished | StageFailed):
            final = ev
    if not isinstance(final, StageFinished):
        raise SystemExit(f"{name} failed: {getattr(final, 'message', final)}")
    return time.time() - t0


def cells(block: dict) -> dict:
    return {
        k: {"value": c["value"], "n": c["n"], "ci": c["ci"]}
        for k, c in block.items()
        if k in KEYS and isinstance(c, dict)
    }


async def bench(root: Path, stages: list[str], extra: list[str]) -> dict:
    ws = init_workspace(root)
    seconds = {}
    for name in stages:
        seconds[name] = await run_stage(ws, name, extra)
    seconds["reward-model"] = await run_stage(ws, "reward-model", extra)
    _records, summary = read_rm_validation(ws.result("rm_validation.json"))
    acc = summary.get("accuracy") or {}
    trained = acc.get("trained") or acc.get("base") or {}
    return {
        "accuracy": {name: cells(acc[name]) for name in ("base", "trained") if name in acc},
        "position_bias_nats": trained.get("position_bias_nats"),
        "decided_share": {
            "calibrated": trained.get("decided_share"),
            "agreement": trained.get("decided_share_agreement"),
        },
        "seconds_per_comparison": trained.get("seconds_per_comparison"),
        "tie_margin_sweep": {
            name: tie_margin_sweep(acc[name]) for name in ("base", "trained") if name in acc
        },
        "base_judge": {
            k: (acc.get("base") or {}).get(k)
            for k in ("position_bias_nats", "decided_share", "decided_share_agreement")
        },
        "warnings": summary.get("warnings", []),
        "stages": stages,
        "settings": extra,
        "stage_seconds": seconds,
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="workspace folder to use and keep (default: a temp folder)")
    ap.add_argument("--stages", default="baseline,prompting", help="sampling stages first")
    ap.add_argument("--set", action="append", default=[], help="config override section.key=v")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if args.keep:
        out = asyncio.run(bench(Path(args.keep), stages, args.set))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = asyncio.run(bench(Path(tmp) / "ws", stages, args.set))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
