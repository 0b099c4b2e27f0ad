"""Benchmark of the local backend against TRL on this machine (issue 2 §5).

Measures, on the default model (SmolLM2-135M-Instruct) and the compute plan the service
picks (bf16 on CPUs with AVX512_BF16):

- LoRA SFT training tokens/s at batch 4 x 512 tokens through ``LocalServiceClient``
  (rank 16, every linear layer, ``forward_backward("cross_entropy")`` + ``optim_step``);
- the same batch shape trained by TRL's ``SFTTrainer`` + peft (r=16, ``all-linear``, same
  dtype, TRL's own defaults otherwise), and the ratio ours / TRL;
- sampling tokens/s at 1, 8 and 32 sequences;
- peak RSS of each side, measured in separate subprocesses.

Each part runs in a subprocess of this script (``--part ours`` / ``--part trl``) with
``HF_HUB_OFFLINE=1``, one after the other, so their peaks and timings do not mix. The last
line printed is one JSON object.

    .venv/bin/python bench/local_backend.py            # full run (about 2-3 minutes on 2 idle cores)
    .venv/bin/python bench/local_backend.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 4
SEQ_LEN = 512
RANK = 16
SAMPLE_COUNTS = (1, 8, 32)
TARGETS = {"train_vs_trl": 1.5, "sample_32_vs_1": 5.0, "peak_rss_mb": 6000.0}
# Plain-text continuation: the model seldom emits <|im_end|> outside a chat turn, so rows
# run to max_tokens. Any row that stops early is counted by its actual length anyway.
PROMPT = "The history of the city begins in the early morning of a cold winter day, when"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _batch_tokens(vocab: int, seed: int = 0) -> list[list[int]]:
    """BATCH rows of SEQ_LEN + 1 token ids (inputs are [:-1], targets [1:])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (BATCH, SEQ_LEN + 1), generator=g).tolist()


# ---- our backend ------------------------------------------------------------------------


def part_ours(steps: int, max_tokens: int) -> dict:
    import torch
    from tinker import types

    from engine.backends.local import DEFAULT_MODEL, LocalServiceClient

    out: dict = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp, LocalServiceClient(checkpoint_dir=tmp) as svc:
        t0 = time.perf_counter()
        tc = svc.create_lora_training_client(DEFAULT_MODEL, rank=RANK, seed=0).result()
        out["load_s"] = round(time.perf_counter() - t0, 2)
        rt = tc._rt
        out["dtype"] = rt.plan.dtype_name
        out["gradient_checkpointing"] = bool(getattr(rt, "gradient_checkpointing", True))
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(row[:-1]),
                loss_fn_inputs={
                    "target_tokens": row[1:],
                    "weights": [1.0] * SEQ_LEN,
                },
            )
            for row in _batch_tokens(rt.vocab_size)
        ]
        adam = types.AdamParams(learning_rate=1e-4)

        def step() -> float:
            t = time.perf_counter()
            fb = tc.forward_backward(data, "cross_entropy")
            op = tc.optim_step(adam)
            loss = fb.result().metrics["loss:sum"]
            op.result()
            return time.perf_counter() - t, loss

        warm, _ = step()
        times, losses = [], []
        for _ in range(steps):
            dt, loss = step()
            times.append(dt)
            losses.append(loss / (BATCH * SEQ_LEN))
        out["train_warmup_s"] = round(warm, 2)
        out["train_step_s"] = [round(t, 3) for t in times]
        out["train_tokens_per_s"] = BATCH * SEQ_LEN * len(times) / sum(times)
        out["train_loss_per_token"] = [round(x, 4) for x in losses]
        out["train_peak_rss_mb"] = _peak_rss_mb()

        # Sample from the adapter just trained (as RL and DPO rounds do): LoRA is in the path.
        sc = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(rt.tokenizer.encode(PROMPT))
        sampling = {}
        for n in SAMPLE_COUNTS:
            params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=n)
            sc.sample(
                prompt,
                num_samples=n,
                sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0, seed=0),
            ).result()  # warm-up at this batch size
            t = time.perf_counter()
            res = sc.sample(prompt, num_samples=n, sampling_params=params).result()
            dt = time.perf_counter() - t
            generated = sum(len(s.tokens) for s in res.sequences)
            sampling[str(n)] = {
                "tokens": generated,
                "seconds": round(dt, 3),
                "tokens_per_s": generated / dt,
                "stopped_early": sum(s.stop_reason == "stop" for s in res.sequences),
            }
        out["sampling"] = sampling
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


# ---- TRL ----------------------------------------------------------------------------------


def part_trl(steps: int, dtype_name: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from engine.backends.local import DEFAULT_MODEL, ensure_model_dir

    model_dir = ensure_model_dir(DEFAULT_MODEL)
    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    total_steps = steps + 1  # first step is warm-up
    rows = [
        r[:SEQ_LEN]
        for seed in range(total_steps)
        for r in _batch_tokens(model.config.vocab_size, seed)
    ]
    dataset = Dataset.from_dict({"input_ids": rows})

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.ends.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            max_steps=total_steps,
            max_length=SEQ_LEN,
            packing=False,
            learning_rate=1e-4,
            bf16=dtype_name == "bfloat16",
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_steps=1000,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=RANK,
                lora_alpha=32,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
            callbacks=[clock],
        )
        trainer.train()
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    timed = durations[1:]
    return {
        "dtype": dtype_name,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "train_warmup_s": round(durations[0], 2),
        "train_step_s": [round(t, 3) for t in timed],
        "train_tokens_per_s": BATCH * SEQ_LEN * len(timed) / sum(timed),
        "peak_rss_mb": _peak_rss_mb(),
    }


# ---- driver -------------------------------------------------------------------------------


def _run_part(part: str, args: argparse.Namespace, dtype_name: str | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [
        sys.executable,
        __file__,
        "--part",
        part,
        "--steps",
        str(args.steps),
        "--max-tokens",
        str(args.max_tokens),
    ]
    if dtype_name:
        cmd += ["--dtype", dtype_name]
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"part {part!r} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, shorter samples")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 3)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens per sample (default 64)"
    )
    parser.add_argument("--skip-trl", action="store_true", help="measure our backend only")
    parser.add_argument("--part", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.quick else 3)
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)

    if args.part == "ours":
        print(json.dumps(part_ours(args.steps, args.max_tokens)))
        return
    if args.part == "trl":
        print(json.dumps(part_trl(args.steps, args.dtype)))
        return

    load_before = _load()
    t0 = time.perf_counter()
    ours = _run_part("ours", args)
    trl = None if args.skip_trl else _run_part("trl", args, ours["dtype"])
    load_after = _load()

    s = ours["sampling"]
    sample_ratio = s["32"]["tokens_per_s"] / s["1"]["tokens_per_s"]
    train_ratio = ours["train_tokens_per_s"] / trl["train_tokens_per_s"] if trl else None
    print(f"load average before/after: {load_before} / {load_after} ({os.cpu_count()} CPUs)")
    print(
        f"ours  train: {ours['train_tokens_per_s']:7.1f} tok/s  steps {ours['train_step_s']} s  "
        f"({ours['dtype']}, gradient checkpointing {ours['gradient_checkpointing']}, "
        f"warm-up {ours['train_warmup_s']} s)"
    )
    if trl:
        print(
            f"TRL   train: {trl['train_tokens_per_s']:7.1f} tok/s  steps {trl['train_step_s']} s  "
            f"(gradient checkpointing {trl['gradient_checkpointing']}, peak {trl['peak_rss_mb']:.0f} MB)"
        )
        print(f"ours / TRL : {train_ratio:.2f}x  (target >= {TARGETS['train_vs_trl']})")
    for n, r in s.items():
        print(
            f"sample x{n:>2}: {r['tokens_per_s']:7.1f} tok/s  ({r['tokens']} tokens in {r['seconds']} s, "
            f"{r['stopped_early']} stopped early)"
        )
    print(f"32 vs 1    : {sample_ratio:.2f}x  (target >= {TARGETS['sample_32_vs_1']})")
    print(f"ours peak RSS: {ours['peak_rss_mb']:.0f} MB  (target < {TARGETS['peak_rss_mb']:.0f})")
    result = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dtype": ours["dtype"],
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "lora_rank": RANK,
        "timed_steps": args.steps,
        "gradient_checkpointing": ours["gradient_checkpointing"],
        "train_tokens_per_s": round(ours["train_tokens_per_s"], 1),
        "trl_train_tokens_per_s": round(trl["train_tokens_per_s"], 1) if trl else None,
        "train_ratio_vs_trl": round(train_ratio, 2) if trl else None,
        "sample_tokens_per_s": {n: round(r["tokens_per_s"], 1) for n, r in s.items()},
        "sample_ratio_32_vs_1": round(sample_ratio, 2),
        "peak_rss_mb": round(ours["peak_rss_mb"]),
        "trl_peak_rss_mb": round(trl["peak_rss_mb"]) if trl else None,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "wall_s": round(time.perf_counter() - t0, 1),
        "targets_met": {
            "train_vs_trl": bool(trl) and train_ratio >= TARGETS["train_vs_trl"],
            "sample_32_vs_1": sample_ratio >= TARGETS["sample_32_vs_1"],
            "peak_rss": ours["peak_rss_mb"] < TARGETS["peak_rss_mb"],
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
