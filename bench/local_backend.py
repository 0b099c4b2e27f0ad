"""Benchmark of the local backend against TRL and plain ``generate`` on this machine.

Measures, on the default model (SmolLM2-135M-Instruct) and the compute plan the service
picks (bf16 on CPUs with AVX512_BF16 or AMX, fp32 otherwise; ``PERSONA_DTYPE=fp32`` or
``bf16`` measures the other path; ``PERSONA_THREADS`` fixes the thread count):

- the machine's own matmul peak (GFLOP/s) at the model's shapes, in bf16 and fp32, and
  every throughput below also as a fraction of the peak of the dtype used;
- a 512-token forward at 1 thread and at every core (what the thread choice is about);
- the variable-length case: a batch of rows of 50..700 tokens, tokens/s vs 4 x 512;
- sampling at 1, 8 and 32 sequences from the base model against plain ``transformers``
  ``generate`` (same weights, dtype, prompt, length, sampling at temperature 1), measured
  alternately in the same process, and from a LoRA adapter;
- continuous batching: 32 requests submitted at random intervals vs all at once;

- LoRA SFT training tokens/s at batch 4 x 512 tokens through ``LocalServiceClient``
  (rank 16, every linear layer, ``forward_backward("cross_entropy")`` + ``optim_step``);
- the same batch shape trained by TRL's ``SFTTrainer`` + peft (r=16, ``all-linear``, same
  dtype, TRL's own defaults otherwise), and the ratio ours / TRL; both after
  ``WARMUP_STEPS`` untimed steps, whose times are printed too;
- sampling tokens/s at 1, 8 and 32 sequences;
- peak RSS of each side, measured in separate subprocesses.

Each part runs in a subprocess of this script (``--part ours`` / ``--part trl``) with
``HF_HUB_OFFLINE=1``, one after the other, so their peaks and timings do not mix. The last
line printed is one JSON object.

    .venv/bin/python bench/local_backend.py            # full run (about 2-3 minutes on 2 idle cores)
    .venv/bin/python bench/local_backend.py --quick    # fewer steps

Timings on a shared machine are noisy: compare the ratios measured within one run.
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
from functools import partial
from pathlib import Path

BATCH = 4
SEQ_LEN = 512
RANK = 16
# Training steps before the timed ones. The first few steps after the model loads run up to
# a quarter slower (the process is still taking its memory from the system: the logits
# alone are 200 MB in bf16), and the stages train for dozens of steps, so the steady state
# is timed; the warm-up steps are printed beside it.
WARMUP_STEPS = 3
SAMPLE_COUNTS = (1, 8, 32)
TARGETS = {
    "train_vs_trl": 1.5,
    "sample_32_vs_1": 5.0,
    "peak_rss_mb": 6000.0,
    "sample_vs_generate_32": 4.0,
    "sample_vs_generate_1": 1.5,
}
VARLEN_ROWS = 6  # rows of 50..700 tokens in the variable-length batch
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


def _model_shapes(cfg) -> list[tuple[int, int]]:  # noqa: ANN001
    """(in, out) of every matmul of one token's forward, one layer's worth plus lm_head."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def _train_flop_per_token(cfg, seq_len: int) -> float:  # noqa: ANN001
    """Forward + input-gradient backward of the frozen base (LoRA's own products are < 2%)."""
    layer = sum(a * b for a, b in _model_shapes(cfg)) * cfg.num_hidden_layers
    macs = layer + cfg.hidden_size * cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * cfg.num_attention_heads * hd * (seq_len / 2) * cfg.num_hidden_layers  # causal
    return 2 * 2 * (macs + attn)


def _train_linear_flop_per_token(cfg) -> float:  # noqa: ANN001
    """The linear layers' share of ``_train_flop_per_token`` (everything but attention)."""
    layer = sum(a * b for a, b in _model_shapes(cfg)) * cfg.num_hidden_layers
    return 2 * 2 * (layer + cfg.hidden_size * cfg.vocab_size)


def _decode_flop_per_token(cfg) -> float:  # noqa: ANN001
    layer = sum(a * b for a, b in _model_shapes(cfg)) * cfg.num_hidden_layers
    return 2.0 * (layer + cfg.hidden_size * cfg.vocab_size)


def matmul_peak(cfg, threads: int) -> dict:  # noqa: ANN001
    """GFLOP/s of F.linear at the model's shapes (training M=2048, decoding M=32, M=1)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    out = {}
    shapes = [*_model_shapes(cfg)[3:], (cfg.hidden_size, cfg.vocab_size)]
    for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        best = {}
        for m in (2048, 32, 1):
            rates = []
            for k, n in shapes:
                x, w = torch.randn(m, k).to(dt), torch.randn(n, k).to(dt)
                F.linear(x, w)
                flop = 2.0 * m * k * n
                reps = max(2, int(2e8 / flop) if dt == torch.bfloat16 else int(1e8 / flop))
                t = time.perf_counter()
                for _ in range(reps):
                    F.linear(x, w)
                rates.append(flop * reps / (time.perf_counter() - t) / 1e9)
            best[str(m)] = round(max(rates), 1)
        out[name] = best
    return out


def attention_seconds(cfg, dtype) -> float:  # noqa: ANN001
    """PyTorch's own causal attention, forward and backward, for one training step's batch
    (BATCH x SEQ_LEN, the model's heads, every layer): the part of a step no linear-layer
    work can shorten."""
    import torch
    import torch.nn.functional as F

    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads

    # The inputs are drawn once, outside the clock: drawing 2 M normals each time took about
    # a quarter of what this used to report.
    q = torch.randn(BATCH, heads, SEQ_LEN, hd, dtype=dtype, requires_grad=True)
    k = torch.randn(BATCH, kv, SEQ_LEN, hd, dtype=dtype, requires_grad=True)
    v = torch.randn(BATCH, kv, SEQ_LEN, hd, dtype=dtype, requires_grad=True)
    up = torch.ones_like(q)

    def one() -> None:
        q.grad = k.grad = v.grad = None
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv)
        o.backward(up)

    one()
    t = time.perf_counter()
    for _ in range(3):
        one()
    return round((time.perf_counter() - t) / 3 * cfg.num_hidden_layers, 2)


def decode_linears_ms(rt, rows: int) -> float | None:  # noqa: ANN001
    """The linear layers of one decode step at ``rows`` rows, called as the step calls them
    (fused q|k|v, the post-ops, the head; weights read from memory as in a real step): the
    part of a step no work outside the matmul kernels can shorten. None without the fast
    decoder."""
    import torch

    dec = rt.decoder
    if dec is None:
        return None
    layers = dec._fused()
    dec._use_adapter()
    hidden = rt.model.config.hidden_size
    nq, d = dec.n_heads, dec.head_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(rt.dtype)
    attn = torch.randn(rows, nq * d, generator=g).to(rt.dtype)

    def one() -> None:
        h = x
        for w in layers:
            w["qkv"](h)
            h = w["o"].add(attn, h)
            h = w["down"].add(w["up"].mul(h, w["gate"].silu(h)), h)
        dec._fused_head(h)

    with torch.no_grad():
        one()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            one()
            best = min(best, time.perf_counter() - t)
    return round(best * 1e3, 2)


def forward_threads(rt, tokens: list[int]) -> dict:  # noqa: ANN001
    """A 512-token forward (no grad) at 1 thread and at every usable core: tokens/s."""
    import torch

    from engine.backends.local.hardware import usable_cpus

    ids = torch.tensor([tokens[:SEQ_LEN]])
    before = torch.get_num_threads()
    out = {}
    for n in sorted({1, usable_cpus()}):
        torch.set_num_threads(n)
        with torch.no_grad():
            rt.model(input_ids=ids, use_cache=False)
            t = time.perf_counter()
            rt.model(input_ids=ids, use_cache=False)
            out[str(n)] = round(SEQ_LEN / (time.perf_counter() - t), 1)
    torch.set_num_threads(before)
    return out


# ---- our backend ------------------------------------------------------------------------

# Before/after of the training step's switches, measured alternately in one process:
# (name, {"module.ATTRIBUTE" under engine.backends.local: value}); the first is the default.
TRAIN_AB = (
    (
        "default (full logits, fused norms and rotary, packed weights, shared-input LoRA)",
        {
            "compute.CHUNKED_HEAD": False,
            "norms.FUSED_NORMS": True,
            "rotary.FUSED_ROTARY": True,
            "lora.PACKED_FORWARD": True,
            "lora.SHARED_INPUT": True,
        },
    ),
    ("chunked head", {"compute.CHUNKED_HEAD": True}),
    ("the model's own norms", {"norms.FUSED_NORMS": False}),
    ("the model's own rotary", {"rotary.FUSED_ROTARY": False}),
    ("F.linear's weights", {"lora.PACKED_FORWARD": False}),
    ("one LoRA node per layer", {"lora.SHARED_INPUT": False}),
)


def _train_ab(step, data: list, steps: int) -> dict:  # noqa: ANN001
    """Training step seconds for each TRAIN_AB variant, the variants taking turns."""
    import importlib

    def place(key: str) -> tuple[object, str]:
        module, _, attr = key.rpartition(".")
        return importlib.import_module(f"engine.backends.local.{module}"), attr

    saved = {k: getattr(*place(k)) for _, cfg in TRAIN_AB for k in cfg}
    times: dict[str, list[float]] = {name: [] for name, _ in TRAIN_AB}
    try:
        for rep in range(steps + 1):
            for name, cfg in TRAIN_AB:
                for k, v in saved.items():
                    setattr(*place(k), cfg.get(k, v))
                dt, _ = step(data)
                if rep:  # the first round is a warm-up for each
                    times[name].append(round(dt, 3))
    finally:
        for k, v in saved.items():
            setattr(*place(k), v)
    return times


def _plain_generate(  # noqa: ANN001
    model, prompt: list[int], n: int, max_tokens: int, seed: int, top_p: float = 1.0
) -> int:
    """Plain transformers generate, sampling at temperature 1 for exactly max_tokens tokens."""
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor([prompt] * n)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=top_p,
            pad_token_id=2,
        )
    return (out.shape[1] - len(prompt)) * n


def part_ours(steps: int, max_tokens: int) -> dict:
    import random

    import torch
    from tinker import types
    from transformers import AutoModelForCausalLM

    from engine.backends.local import DEFAULT_MODEL, LocalServiceClient
    from engine.backends.local.hardware import (
        cpu_model_name,
        load_average,
        reported_cpu_flags,
        usable_cpus,
    )

    out: dict = {
        "cpu": cpu_model_name(),
        "cpu_flags": reported_cpu_flags(),
        "usable_cpus": usable_cpus(),
        "load_at_start": load_average(),
    }
    with tempfile.TemporaryDirectory() as tmp, LocalServiceClient(checkpoint_dir=tmp) as svc:
        out["threads"] = svc.threads
        out["threads_env"] = os.environ.get("PERSONA_THREADS")
        t0 = time.perf_counter()
        tc = svc.create_lora_training_client(DEFAULT_MODEL, rank=RANK, seed=0).result()
        out["load_s"] = round(time.perf_counter() - t0, 2)
        rt = tc._rt
        cfg = rt.model.config
        out["dtype"] = rt.plan.dtype_name
        out["gradient_checkpointing"] = bool(getattr(rt, "gradient_checkpointing", True))
        out["fast_decoder"] = rt.decoder is not None

        # Every computation runs on the service's own worker thread, as the service's does:
        # each thread that runs parallel torch work starts its own OpenMP team, and with more
        # team threads than cores every parallel operation pays a wake-up (a second team cut
        # one-sequence decoding from about 27 to 17 tok/s on 2 cores).
        def on_worker(fn):  # noqa: ANN001, ANN202
            return svc.run_on_compute_thread(fn).result()

        out["matmul_peak_gflops"] = on_worker(lambda: matmul_peak(cfg, svc.threads))
        on_worker(lambda: torch.set_num_threads(svc.threads))
        batch = _batch_tokens(rt.vocab_size)
        out["forward_512_tokens_per_s_by_threads"] = on_worker(
            lambda: forward_threads(rt, batch[0])
        )

        def as_data(rows: list[list[int]]) -> list:
            return [
                types.Datum(
                    model_input=types.ModelInput.from_ints(row[:-1]),
                    loss_fn_inputs={"target_tokens": row[1:], "weights": [1.0] * (len(row) - 1)},
                )
                for row in rows
            ]

        data = as_data(batch)
        adam = types.AdamParams(learning_rate=1e-4)

        def step(d: list) -> tuple[float, float]:
            t = time.perf_counter()
            fb = tc.forward_backward(d, "cross_entropy")
            op = tc.optim_step(adam)
            loss = fb.result().metrics["loss:sum"]
            op.result()
            return time.perf_counter() - t, loss

        warm = [step(data)[0] for _ in range(WARMUP_STEPS)]
        times, losses = [], []
        for _ in range(steps):
            dt, loss = step(data)
            times.append(dt)
            losses.append(loss / (BATCH * SEQ_LEN))
        out["train_warmup_s"] = [round(w, 2) for w in warm]
        out["train_step_s"] = [round(t, 3) for t in times]
        out["train_tokens_per_s"] = BATCH * SEQ_LEN * len(times) / sum(times)
        out["train_loss_per_token"] = [round(x, 4) for x in losses]
        out["train_gflops"] = out["train_tokens_per_s"] * _train_flop_per_token(cfg, SEQ_LEN) / 1e9
        out["train_peak_rss_mb"] = _peak_rss_mb()
        out["train_ab"] = _train_ab(step, data, steps)
        out["train_attention_s"] = on_worker(lambda: attention_seconds(cfg, rt.dtype))
        out["train_linear_flop_per_token"] = _train_linear_flop_per_token(cfg)

        # Variable-length batch: real chat data runs 50..700 tokens a row.
        rng = random.Random(0)
        g = torch.Generator().manual_seed(1)
        varlen = [
            torch.randint(3, rt.vocab_size, (rng.randint(50, 700) + 1,), generator=g).tolist()
            for _ in range(VARLEN_ROWS)
        ]
        vdata = as_data(varlen)
        step(vdata)
        vt = [step(vdata)[0] for _ in range(max(1, steps - 1))]
        vtokens = sum(len(r) - 1 for r in varlen)
        out["varlen_lengths"] = [len(r) - 1 for r in varlen]
        out["varlen_tokens_per_s"] = vtokens * len(vt) / sum(vt)

        # Sampling: the base model, ours against plain generate, alternately.
        plain = AutoModelForCausalLM.from_pretrained(rt.model_dir, dtype=rt.dtype).eval()
        prompt_ids = rt.tokenizer.encode(PROMPT)
        prompt = types.ModelInput.from_ints(prompt_ids)
        base = svc.create_sampling_client(base_model=DEFAULT_MODEL).result()
        sampling, generate = {}, {}
        for n in SAMPLE_COUNTS:
            params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=n)
            warm_params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=0)
            base.sample(prompt, num_samples=n, sampling_params=warm_params).result()
            on_worker(partial(_plain_generate, plain, prompt_ids, n, 4, 0))
            ours_t, ours_tok, plain_t, plain_tok, stopped = 0.0, 0, 0.0, 0, 0
            for rep in range(2):
                t = time.perf_counter()
                res = base.sample(prompt, num_samples=n, sampling_params=params).result()
                ours_t += time.perf_counter() - t
                ours_tok += sum(len(s.tokens) for s in res.sequences)
                stopped += sum(s.stop_reason == "stop" for s in res.sequences)
                t = time.perf_counter()
                plain_tok += on_worker(
                    partial(_plain_generate, plain, prompt_ids, n, max_tokens, rep)
                )
                plain_t += time.perf_counter() - t
            sampling[str(n)] = {
                "tokens": ours_tok,
                "seconds": round(ours_t, 3),
                "tokens_per_s": ours_tok / ours_t,
                "stopped_early": stopped,
            }
            generate[str(n)] = {"tokens_per_s": plain_tok / plain_t}
        out["sampling"] = sampling
        out["generate"] = generate
        out["sample_gflops_32"] = sampling["32"]["tokens_per_s"] * _decode_flop_per_token(cfg) / 1e9
        out["decode_linears_ms"] = {
            str(n): on_worker(partial(decode_linears_ms, rt, n)) for n in SAMPLE_COUNTS
        }
        # The stages sample with top_p 0.95: the nucleus costs more than the draw itself.
        nucleus = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.95, seed=9)
        base.sample(prompt, num_samples=32, sampling_params=warm_params).result()
        t = time.perf_counter()
        res = base.sample(prompt, num_samples=32, sampling_params=nucleus).result()
        ours_t = time.perf_counter() - t
        t = time.perf_counter()
        plain_tok = on_worker(
            partial(_plain_generate, plain, prompt_ids, 32, max_tokens, 9, top_p=0.95)
        )
        out["top_p_32"] = {
            "tokens_per_s": sum(len(x.tokens) for x in res.sequences) / ours_t,
            "generate_tokens_per_s": plain_tok / (time.perf_counter() - t),
        }
        del plain

        # Sampling from the adapter just trained (as RL and DPO rounds do): LoRA in the path.
        sc = tc.save_weights_and_get_sampling_client().result()
        params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=3)
        sc.sample(prompt, num_samples=32, sampling_params=params).result()
        t = time.perf_counter()
        res = sc.sample(prompt, num_samples=32, sampling_params=params).result()
        out["lora_sample_32_tokens_per_s"] = sum(len(s.tokens) for s in res.sequences) / (
            time.perf_counter() - t
        )

        # Continuous batching: 32 one-sequence requests at random intervals vs all at once.
        def burst(gaps: list[float]) -> tuple[float, float]:
            futures = []
            t = time.perf_counter()
            for i, gap in enumerate(gaps):
                time.sleep(gap)
                futures.append(
                    base.sample(
                        prompt,
                        num_samples=1,
                        sampling_params=types.SamplingParams(
                            max_tokens=max_tokens, temperature=1.0, seed=100 + i
                        ),
                    )
                )
            last_submit = time.perf_counter() - t
            for f in futures:
                f.result()
            return time.perf_counter() - t, last_submit

        at_once, _ = burst([0.0] * 32)
        one = sampling["1"]["seconds"] / 2  # one request alone, from the sampling case
        rng = random.Random(1)
        # Arrivals spread over about two single-request passes: without joining, most would
        # wait for the pass in flight to end.
        spread = [rng.expovariate(16.0 / one) for _ in range(32)]
        random_total, last_submit = burst(spread)
        out["continuous_batching"] = {
            "requests": 32,
            "all_at_once_s": round(at_once, 2),
            "random_intervals_s": round(random_total, 2),
            "random_last_submit_s": round(last_submit, 2),
            "one_request_alone_s": round(one, 2),
            "sequential_estimate_s": round(32 * one, 2),
        }
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


# ---- TRL ----------------------------------------------------------------------------------


def part_trl(steps: int, dtype_name: str, threads: int | None = None) -> dict:
    import torch

    if threads:  # the thread count ours ran with, so the comparison is like for like
        torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from engine.backends.local import DEFAULT_MODEL, ensure_model_dir

    model_dir = ensure_model_dir(DEFAULT_MODEL)
    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    total_steps = steps + WARMUP_STEPS
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
    timed = durations[WARMUP_STEPS:]  # the first also holds the trainer's setup
    return {
        "dtype": dtype_name,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "train_warmup_s": [round(d, 2) for d in durations[:WARMUP_STEPS]],
        "train_step_s": [round(t, 3) for t in timed],
        "train_tokens_per_s": BATCH * SEQ_LEN * len(timed) / sum(timed),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": _peak_rss_mb(),
    }


# ---- driver -------------------------------------------------------------------------------


def _run_part(
    part: str, args: argparse.Namespace, dtype_name: str | None = None, threads: int | None = None
) -> dict:
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
    if threads:
        cmd += ["--threads", str(threads)]
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
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.quick else 3)
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)

    if args.part == "ours":
        print(json.dumps(part_ours(args.steps, args.max_tokens)))
        return
    if args.part == "trl":
        print(json.dumps(part_trl(args.steps, args.dtype, args.threads)))
        return

    load_before = _load()
    t0 = time.perf_counter()
    ours = _run_part("ours", args)
    trl = None if args.skip_trl else _run_part("trl", args, ours["dtype"], ours["threads"])
    load_after = _load()

    s = ours["sampling"]
    gen = ours["generate"]
    sample_ratio = s["32"]["tokens_per_s"] / s["1"]["tokens_per_s"]
    vs_generate = {n: s[n]["tokens_per_s"] / gen[n]["tokens_per_s"] for n in s}
    train_ratio = ours["train_tokens_per_s"] / trl["train_tokens_per_s"] if trl else None
    peak = ours["matmul_peak_gflops"][ours["dtype"]]
    # The peak is the best rate seen at the model's shapes (any M); on a shared machine a
    # single measurement can land low, so take the larger of the big-M figures.
    peak_train = max(peak["2048"], peak["32"])
    peak_decode = peak_train
    train_fraction = ours["train_gflops"] / peak_train
    cb = ours["continuous_batching"]
    flags = ", ".join(ours["cpu_flags"])
    path = "bf16" if ours["dtype"] == "bfloat16" else "fp32"
    why = (
        "PERSONA_DTYPE"
        if os.environ.get("PERSONA_DTYPE")
        else (
            "CPU has avx512_bf16/amx_bf16"
            if path == "bf16"
            else "no avx512_bf16/amx_bf16 on this CPU"
        )
    )
    print(f"CPU: {ours['cpu']}; flags: {flags}")
    print(
        f"path: {path} ({why}); threads {ours['threads']} of {ours['usable_cpus']} "
        f"(load at start {ours['load_at_start']:.2f}"
        f"{', PERSONA_THREADS=' + ours['threads_env'] if ours['threads_env'] else ', auto'})"
    )
    print(f"load average before/after: {load_before} / {load_after} ({os.cpu_count()} CPUs)")
    for name, by_m in ours["matmul_peak_gflops"].items():
        print(
            f"matmul peak {name:8s}: " + ", ".join(f"M={m}: {g} GFLOP/s" for m, g in by_m.items())
        )
    fwd = ours["forward_512_tokens_per_s_by_threads"]
    print(
        "512-token forward by threads: "
        + ", ".join(f"{t} thread(s) {v} tok/s" for t, v in fwd.items())
    )
    print(
        f"ours  train: {ours['train_tokens_per_s']:7.1f} tok/s  steps {ours['train_step_s']} s  "
        f"({ours['dtype']}, gradient checkpointing {ours['gradient_checkpointing']}, "
        f"warm-up {ours['train_warmup_s']} s) = {ours['train_gflops']:.0f} GFLOP/s, "
        f"{train_fraction:.0%} of the matmul peak"
    )
    step_s = BATCH * SEQ_LEN / ours["train_tokens_per_s"]
    linear_floor = ours["train_linear_flop_per_token"] * BATCH * SEQ_LEN / (peak_train * 1e9)
    print(
        f"  of a {step_s:.2f} s step: attention (PyTorch's CPU kernel, forward + backward) "
        f"{ours['train_attention_s']:.2f} s; the linear layers at the matmul peak would take "
        f"{linear_floor:.2f} s: floor {ours['train_attention_s'] + linear_floor:.2f} s"
    )
    ab = ours["train_ab"]
    print(
        "training step, alternately in this run: "
        + "; ".join(f"{name} {min(t):.2f} s (of {t})" for name, t in ab.items())
    )
    print(
        f"variable-length batch {ours['varlen_lengths']}: {ours['varlen_tokens_per_s']:7.1f} tok/s "
        f"({ours['varlen_tokens_per_s'] / ours['train_tokens_per_s']:.2f}x the 4 x 512 batch)"
    )
    if trl:
        print(
            f"TRL   train: {trl['train_tokens_per_s']:7.1f} tok/s  steps {trl['train_step_s']} s  "
            f"(gradient checkpointing {trl['gradient_checkpointing']}, {trl['threads']} thread(s), "
            f"peak {trl['peak_rss_mb']:.0f} MB)"
        )
        print(f"ours / TRL : {train_ratio:.2f}x  (target >= {TARGETS['train_vs_trl']})")
    for n, r in s.items():
        print(
            f"sample x{n:>2}: {r['tokens_per_s']:7.1f} tok/s vs generate {gen[n]['tokens_per_s']:7.1f} "
            f"= {vs_generate[n]:.2f}x  ({r['tokens']} tokens in {r['seconds']} s, "
            f"{r['stopped_early']} stopped early)"
        )
    tp = ours["top_p_32"]
    print(
        f"sample x32 at top_p 0.95 (the stages' setting): {tp['tokens_per_s']:7.1f} tok/s vs "
        f"generate {tp['generate_tokens_per_s']:7.1f} = "
        f"{tp['tokens_per_s'] / tp['generate_tokens_per_s']:.2f}x"
    )
    print(
        f"sample x32 = {ours['sample_gflops_32']:.0f} GFLOP/s, "
        f"{ours['sample_gflops_32'] / peak_decode:.0%} of the matmul peak; "
        f"from a LoRA adapter: {ours['lora_sample_32_tokens_per_s']:.1f} tok/s"
    )
    print(f"32 vs 1    : {sample_ratio:.2f}x  (target >= {TARGETS['sample_32_vs_1']})")
    step_ms = {n: 1e3 * int(n) / r["tokens_per_s"] for n, r in s.items()}
    lin = ours["decode_linears_ms"]
    for n, want in (
        ("1", TARGETS["sample_vs_generate_1"]),
        ("32", TARGETS["sample_vs_generate_32"]),
    ):
        budget = 1e3 * int(n) / (want * gen[n]["tokens_per_s"])
        print(
            f"  a {n}-row token step: {step_ms[n]:.1f} ms (sampling and bookkeeping included); "
            f"its linear layers alone {lin[n] if lin[n] is not None else '?'} ms; "
            f"{want:g}x generate needs <= {budget:.1f} ms"
        )
    print(
        f"continuous batching, 32 requests: all at once {cb['all_at_once_s']} s, at random "
        f"intervals {cb['random_intervals_s']} s (last submitted at {cb['random_last_submit_s']} s); "
        f"one alone {cb['one_request_alone_s']} s"
    )
    print(f"ours peak RSS: {ours['peak_rss_mb']:.0f} MB  (target < {TARGETS['peak_rss_mb']:.0f})")
    result = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dtype": ours["dtype"],
        "cpu_flags": ours["cpu_flags"],
        "threads": ours["threads"],
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
        "sample_vs_generate": {n: round(r, 2) for n, r in vs_generate.items()},
        "generate_tokens_per_s": {n: round(r["tokens_per_s"], 1) for n, r in gen.items()},
        "lora_sample_32_tokens_per_s": round(ours["lora_sample_32_tokens_per_s"], 1),
        "top_p_32_tokens_per_s": round(tp["tokens_per_s"], 1),
        "top_p_32_vs_generate": round(tp["tokens_per_s"] / tp["generate_tokens_per_s"], 2),
        "train_attention_s": ours["train_attention_s"],
        "train_step_floor_s": round(ours["train_attention_s"] + linear_floor, 2),
        "train_step_ab_s": ab,
        "decode_step_ms": {n: round(v, 2) for n, v in step_ms.items()},
        "decode_linears_ms": ours["decode_linears_ms"],
        "matmul_peak_gflops": peak_train,
        "matmul_peak_gflops_by_dtype": ours["matmul_peak_gflops"],
        "train_fraction_of_peak": round(train_fraction, 3),
        "sample_32_fraction_of_peak": round(ours["sample_gflops_32"] / peak_decode, 3),
        "varlen_tokens_per_s": round(ours["varlen_tokens_per_s"], 1),
        "forward_512_tokens_per_s_by_threads": fwd,
        "continuous_batching": cb,
        "peak_rss_mb": round(ours["peak_rss_mb"]),
        "trl_peak_rss_mb": round(trl["peak_rss_mb"]) if trl else None,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "wall_s": round(time.perf_counter() - t0, 1),
        "targets_met": {
            "train_vs_trl": bool(trl) and train_ratio >= TARGETS["train_vs_trl"],
            "sample_32_vs_1": sample_ratio >= TARGETS["sample_32_vs_1"],
            "peak_rss": ours["peak_rss_mb"] < TARGETS["peak_rss_mb"],
            "sample_vs_generate_32": vs_generate["32"] >= TARGETS["sample_vs_generate_32"],
            "sample_vs_generate_1": vs_generate["1"] >= TARGETS["sample_vs_generate_1"],
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
