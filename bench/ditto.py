"""DITTO on the default local model: wall time per phase and held-out NLL before/after.

    .venv/bin/python bench/ditto.py [--set ditto.lr=1e-4 ...] [--workspace DIR]

Runs the ditto stage (no final sampling) on a fresh copy of the example workspace with the
local defaults (plus any --set), then scores the person's held-out demonstrations (never
trained on) with ``engine.eval.metrics.likelihood.target_nlls`` under the base policy, the SFT
initialisation and the last DPO round, and DPO pair accuracy (implicit reward of the
demonstration above the SFT-init policy's own samples, against the SFT-init reference) on
training and held-out requests, before DPO (policy = reference: 0) and after it.
The last line is JSON.
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


def cpu_kind() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return "avx512_bf16" if "avx512_bf16" in flags else "avx2/fp32"


async def pair_accuracy(policy, reference, renderer, pairs) -> float:
    """Share of (request, chosen, rejected) whose chosen log-ratio beats the rejected one."""
    from engine.eval.metrics.likelihood import target_nlls

    items = [([{"role": "user", "content": r}], t) for r, c, j in pairs for t in (c, j)]
    pol = await target_nlls(policy, renderer, items)
    ref = await target_nlls(reference, renderer, items)
    ratio = [rf.total - p.total for p, rf in zip(pol, ref, strict=True)]  # log p - log p_ref
    wins = [ratio[2 * i] > ratio[2 * i + 1] for i in range(len(pairs))]
    return sum(wins) / len(wins) if wins else float("nan")


async def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--set", action="append", default=[], help="config override, e.g. ditto.lr=1e-4"
    )
    ap.add_argument(
        "--workspace", default="", help="where to make the workspace (default: a temp dir)"
    )
    args = ap.parse_args()

    from engine.eval.metrics.likelihood import target_nlls
    from engine.llm.sampling import open_sampler
    from engine.pipeline.runner import Runner
    from engine.run.events import CheckpointSaved, LogLine, Metric, Progress, StageFailed
    from engine.stages.ditto_pairs import ReplayBuffer
    from engine.store.checkpoints import latest_checkpoint
    from engine.store.workspace import init_workspace

    root = Path(args.workspace or tempfile.mkdtemp(prefix="ditto-bench-")) / "ws"
    ws = init_workspace(root)
    # runs.keep_checkpoints: the evaluation below reads the SFT-init reference after training
    overrides = ["ditto.sample_after=false", "runs.keep_checkpoints=100", *args.set]
    runner = Runner(ws)
    t0 = time.time()
    marks: list[tuple[str, float]] = [("start", t0)]
    sft_losses, accs, margins = [], [], []
    async for ev in runner.run_stage("ditto", overrides):
        if isinstance(ev, CheckpointSaved):
            marks.append((f"ckpt:{ev.name}", ev.ts))
        elif isinstance(ev, Progress) and ev.label.endswith("sampling") and ev.done == ev.total:
            marks.append(("sampled", ev.ts))
        elif isinstance(ev, Metric) and ev.name == "ditto/sft_loss":
            sft_losses.append(round(ev.value, 3))
        elif isinstance(ev, Metric) and ev.name == "ditto/pair_accuracy":
            accs.append(ev.value)
        elif isinstance(ev, Metric) and ev.name == "ditto/margin":
            margins.append(round(ev.value, 3))
        elif isinstance(ev, LogLine):
            print(ev.message, flush=True)
        elif isinstance(ev, StageFailed):
            raise SystemExit(ev.message)
    train_wall = time.time() - t0

    phases: dict[str, float] = {}
    sampling, dpo = [], []
    prev_t = t0
    for name, t in marks[1:]:
        if name == "ckpt:sft-init":
            phases["sft_init_s"] = round(t - prev_t, 1)
        elif name == "sampled":
            sampling.append(round(t - prev_t, 1))
        elif name.startswith("ckpt:round-"):
            dpo.append(round(t - prev_t, 1))
        prev_t = t

    print(
        json.dumps(
            {
                "phases": phases,
                "sampling": sampling,
                "dpo": dpo,
                "sft": sft_losses,
                "acc": accs,
                "margin": margins,
            }
        ),
        flush=True,
    )

    # ---- held-out NLL and pair accuracy ---------------------------------------------------
    from engine.run.context import StageContext
    from engine.store.config import load_config

    cfg = load_config(ws.config_path, overrides)
    ctx = StageContext(workspace=ws, config=cfg, stage="bench", run_dir=ws.root / "runs" / "bench")
    entry = latest_checkpoint(ws.results_dir, "ditto")
    split = ctx.split()
    base = await open_sampler(ctx)
    init = await open_sampler(ctx, model_path=entry["reference_path"])
    final = await open_sampler(ctx, model_path=entry["sampler_path"])

    async def nll(sampler, demos) -> float:
        items = [([{"role": "user", "content": d["input"]}], d["output"]) for d in demos]
        got = await target_nlls(sampler.client, sampler.renderer, items)
        return round(sum(n.total for n in got) / sum(n.tokens for n in got), 4)

    held, train = split.holdout, split.train
    buf = ReplayBuffer.load(entry["buffer_path"])
    train_pairs = [
        (s.request, next(d["output"] for d in train if d["input"] == s.request), s.text)
        for s in buf.samples
        if s.round == 1
    ]
    held_samples = []
    for i, d in enumerate(held):
        texts = await init.generate(
            [{"role": "user", "content": d["input"]}],
            max_tokens=cfg.ditto.max_tokens,
            temperature=cfg.ditto.temperature,
            top_p=1.0,
            seed=1000 + i,
            num_samples=cfg.ditto.samples_per_demo,
            trim_repeats=False,
        )
        held_samples += [(d["input"], d["output"], t) for t in texts]
    result = {
        "bench": "ditto",
        "cpu": cpu_kind(),
        "model": cfg.model("policy"),
        "overrides": overrides,
        "train_demos": len(train),
        "heldout_demos": len(held),
        "wall_s": round(train_wall, 1),
        **phases,
        "sampling_per_round_s": sampling,
        "dpo_per_round_s": dpo,
        "sft_losses": sft_losses,
        "dpo_pair_accuracy_by_step": [round(a, 3) for a in accs],
        "dpo_margin_by_step": margins,
        "heldout_nll_before": await nll(base, held),
        "heldout_nll_sft_init": await nll(init, held),
        "heldout_nll_after": await nll(final, held),
        "train_nll_before": await nll(base, train),
        "train_nll_sft_init": await nll(init, train),
        "train_nll_after": await nll(final, train),
        "train_pair_accuracy_after": round(
            await pair_accuracy(final.client, init.client, final.renderer, train_pairs), 3
        ),
        "heldout_pair_accuracy_after": round(
            await pair_accuracy(final.client, init.client, final.renderer, held_samples), 3
        ),
    }
    await asyncio.sleep(0)
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
