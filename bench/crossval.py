"""Cross-validation on the example data: wall time per fold and stage, each method's pooled NLL
with its interval and n, and the paired NLL differences against few-shot.

    .venv/bin/python bench/crossval.py [--folds 5] [--set ditto.rounds=2 ...] [--workspace DIR]
    .venv/bin/python bench/crossval.py --tiny      # the tiny random model: proves it runs

Runs ``persona crossval``'s own code (engine.crossval) on a fresh copy of the example workspace
with the default local model at a reduced budget (REDUCED, then any --set), chosen to fit in
about 30 minutes on 2 cores. The last line is JSON: ``methods`` -> name -> {nll, ci, n},
``paired_vs_few_shot`` -> name -> {diff, ci, n, sign_test_p}, ``fold_wall_s`` (per fold, each
stage's seconds), plus the CPU kind, the settings and the total wall time.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# The default model, five folds, DITTO at its local defaults, one sample of at most 64 tokens
# per held-out request and no judge (its verdicts are not in the benchmark's output). Measured
# on a 2-core AMX Xeon: 13.5 minutes in all, 2.7 a fold (ditto 2.5, evaluate 0.3). `--set
# ditto.rounds=1 --set ditto.steps_per_round=2 --set ditto.sft_max_steps=4` ran in 5 minutes.
REDUCED = [
    "ditto.sample_after=false",
    "evaluate.samples=1",
    "evaluate.max_tokens=64",
    "evaluate.judge=false",
    "evaluate.dev_prompts=0",
]
TINY = [
    "models.policy=persona/tiny-random",
    "models.teacher=persona/tiny-random",
    "models.judge=persona/tiny-random",
    "ditto.rounds=1",
    "ditto.steps_per_round=1",
    "ditto.sft_max_steps=2",
    "ditto.samples_per_demo=1",
    "ditto.batch_prompts=2",
    "ditto.pairs_per_prompt=1",
    "ditto.max_tokens=4",
    "ditto.rank=4",
    "ditto.max_length=128",
    "ditto.sample_after=false",
    "evaluate.samples=1",
    "evaluate.max_tokens=4",
    "evaluate.judge=false",
    "evaluate.embedding=false",
    "evaluate.dev_prompts=0",
]


def cpu_kind() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return "avx512_bf16" if "avx512_bf16" in flags else "avx2/fp32"


def summary(data: dict) -> dict:
    """The benchmark's keys from results/crossval.json."""
    methods = {
        m: {"nll": d["nll"]["mean"], "ci": [d["nll"]["low"], d["nll"]["high"]], "n": d["nll"]["n"]}
        for m, d in data["methods"].items()
    }
    paired = {
        m: {
            "diff": d["nll"]["diff"],
            "ci": d["nll"]["ci"],
            "n": d["nll"]["n"],
            "sign_test_p": d["nll"]["sign_test_p"],
            "verdict": d["nll"]["verdict"],
        }
        for m, d in data["paired"]["by_reference"].get("few-shot", {}).items()
        if "nll" in d
    }
    return {"methods": methods, "paired_vs_few_shot": paired, "fold_wall_s": data["fold_wall_s"]}


async def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="the tiny random model, minimal budget")
    ap.add_argument("--set", action="append", default=[], help="config override")
    ap.add_argument("--workspace", default="", help="where to make the workspace (default: temp)")
    args = ap.parse_args()

    from engine.backends import quiet_libraries
    from engine.crossval import Crossval, FoldEvent, choose_plan
    from engine.run.events import StageFailed, StageFinished, StageStarted
    from engine.store.workspace import init_workspace

    quiet_libraries()
    if args.tiny:
        from engine.backends.local import DEFAULT_MODEL, ensure_model_dir

        ensure_model_dir(DEFAULT_MODEL)  # the tiny model borrows its tokenizer
        ensure_model_dir("persona/tiny-random")
    root = Path(args.workspace or tempfile.mkdtemp(prefix="crossval-bench-")) / "ws"
    ws = init_workspace(root)
    overrides = [*(TINY if args.tiny else REDUCED), f"crossval.folds={args.folds}", *args.set]
    plan, _ = choose_plan(ws, ws.config(overrides), overrides, None)
    t0 = time.time()
    final = None
    async for item in Crossval(ws, plan).run():
        if isinstance(item, FoldEvent):
            if isinstance(item.event, StageStarted):
                print(f"[{time.time() - t0:7.1f} s] {item.where}", file=sys.stderr, flush=True)
        else:
            final = item
    if not isinstance(final, StageFinished):
        msg = final.message if isinstance(final, StageFailed) else "no result"
        raise SystemExit(f"crossval failed: {msg}")
    data = json.loads(ws.result("crossval.json").read_text(encoding="utf-8"))
    cfg = ws.config(overrides)
    return {
        "cpu": cpu_kind(),
        "model": cfg.model("policy"),
        "folds": plan.k,
        "overrides": overrides,
        "wall_s": round(time.time() - t0, 1),
        "workspace": str(root),
        **summary(data),
    }


if __name__ == "__main__":
    result = asyncio.run(main())
    print(json.dumps(result))
