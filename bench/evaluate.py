"""Benchmark: wall time of the evaluate stage on the real default model (SmolLM2-135M-Instruct,
local backend) with every method present, in a temporary workspace with the example data.

    .venv/bin/python bench/evaluate.py [--keep DIR] [--set section.key=value ...]

Setup (not timed): SFT trains a few steps on the training demonstrations, and its checkpoint
is also registered as the rlaif, ditto and reward-model checkpoints. The weights do not change
what evaluate costs, only how many methods and which judge it runs, so this measures the
stage with all six methods (base, prompted, few-shot, sft, rlaif, ditto) and a LoRA judge,
without training three more stages first. The RL dev file gets ``evaluate.dev_prompts``
requests and the person a few blind picks, so every phase runs.

Progress goes to stderr; the last stdout line is one JSON object: the stage's wall seconds,
the seconds of each phase (from its progress events), counts, and the machine it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.pipeline.runner import Runner  # noqa: E402
from engine.run.events import LogLine, Progress, StageFailed, StageFinished  # noqa: E402
from engine.store.checkpoints import read_registry, record_checkpoint  # noqa: E402
from engine.store.results import append_preference, preference_record  # noqa: E402
from engine.store.split import workspace_split  # noqa: E402
from engine.store.workspace import init_workspace  # noqa: E402

DEV_REQUESTS = [
    "Thank Jo for covering my shift on Saturday.",
    "Ask the landlord when the radiator will be fixed.",
    "Tell the team the Friday sync moves to 3pm.",
    "Ask Priya for the slides from yesterday's talk.",
    "Decline the invitation to the alumni dinner on 5/14.",
    "Remind Sam that the reimbursement form is due Monday.",
    "Congratulate Alex on the new job.",
    "Ask the clinic to resend my lab results.",
]


def machine() -> dict:
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "bf16_cpu": "avx512_bf16" in flags or "amx_bf16" in flags,
        "gpu": gpu,
    }


async def bench(root: Path, extra: list[str]) -> dict:
    ws = init_workspace(root)
    from engine.store.config import load_config

    split = workspace_split(ws, load_config(ws.config_path).data)
    rows = [
        {
            "id": f"bench-{i}",
            "seed": "bench",
            "status": "accepted",
            "messages": [
                {"role": "user", "content": d["input"]},
                {"role": "assistant", "content": d["output"]},
            ],
        }
        for i, d in enumerate(split.train)
    ]
    ws.result("synthetic_personalized_data.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    t0 = time.perf_counter()
    sft = await Runner(ws).run(
        "sft", ["sft.steps=2", "sft.batch_size=2", "sft.sample_after=false", "sft.max_length=512"]
    )
    if not isinstance(sft, StageFinished):
        raise SystemExit(f"setup failed: {sft}")
    setup_s = time.perf_counter() - t0
    entry = read_registry(ws.results_dir)["sft"]
    for stage in ("rlaif", "ditto"):
        record_checkpoint(ws.results_dir, stage, **entry)
    record_checkpoint(ws.results_dir, "reward-model", **entry, mode="verdict")
    ws.result("rl_dev_data.jsonl").write_text(
        "".join(
            json.dumps({"prompt_conversation": [{"role": "user", "content": t}], "reference": None})
            + "\n"
            for t in DEV_REQUESTS
        )
    )
    held = split.holdout[0]["input"]
    for a, b, c in (
        ("sft", "baseline", "a"),
        ("few-shot", "ditto", "b"),
        ("rlaif", "prompting", "tie"),
    ):
        append_preference(ws.results_dir, preference_record(held, a, b, c))

    phases: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    final = None
    async for ev in Runner(ws).run_stage("evaluate", extra):
        now = time.perf_counter() - t0
        if isinstance(ev, Progress) and ev.label:
            phases.setdefault(ev.label, [now, now])[1] = now
            if ev.done == 0:
                print(f"  {now:7.1f}s {ev.label} (0/{ev.total})", file=sys.stderr)
        elif isinstance(ev, LogLine):
            print(f"  {now:7.1f}s {ev.message.splitlines()[-1][:150]}", file=sys.stderr)
        final = ev
    wall = time.perf_counter() - t0
    if isinstance(final, StageFailed):
        raise SystemExit(f"evaluate failed: {final.message}")
    data = json.loads(ws.result("evaluation.json").read_text())
    return {
        "bench": "evaluate",
        "model": data["policy_model"],
        "machine": machine(),
        "methods": [m["name"] for m in data["methods"]],
        "held_out": data["holdout"]["n"],
        "samples_per_request": data["samples_per_request"],
        "judge_comparisons": data["judge"].get("stats", {}).get("comparisons"),
        "judge_unparsable_rate": data["judge"].get("stats", {}).get("unparsable_rate"),
        "evaluate_wall_s": round(wall, 1),
        "phases_s": {k: round(v[1] - v[0], 1) for k, v in phases.items()},
        "setup_s": round(setup_s, 1),
        "overrides": extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="workspace folder to create and keep")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    if args.keep:
        result = asyncio.run(bench(args.keep, args.overrides))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(bench(Path(tmp) / "ws", args.overrides))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
