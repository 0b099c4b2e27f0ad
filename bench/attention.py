"""Benchmark: the training step's attention, the CPU flash kernel against plain matmuls.

    .venv/bin/python bench/attention.py [--threads N] [--repeats R]

At the default model's attention shape (9 query heads, 3 key/value heads, head size 64,
bf16 on a CPU with bf16 support, else fp32), for 2,048 tokens a batch as 4 x 512 and
2 x 1,024 rows: one forward and backward of causal attention through
``scaled_dot_product_attention`` (the flash kernel on a CPU) and through two matmuls with
a float32 softmax, per layer, times the model's 30 layers. Also checks that both give the
same outputs and gradients (within bf16 rounding). The last stdout line is one JSON object:
``{"dtype", "threads", "shapes": {"4x512": {"flash_s", "matmul_s", "max_abs_diff"}, ...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.backends.local.hardware import cpu_supports_bf16  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * d**-0.5
    causal = torch.ones(t, t, dtype=torch.bool).triu_(1)
    probs = torch.softmax(scores.masked_fill_(causal, float("-inf")), dim=-1)
    return torch.matmul(probs.to(q.dtype), v)


def time_one(fn, rows: int, length: int, dtype: torch.dtype, repeats: int) -> tuple[float, list]:  # noqa: ANN001
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(rows, HEADS, length, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(rows, KV_HEADS, length, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(rows, KV_HEADS, length, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(rows, HEADS, length, HEAD_DIM, generator=gen).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        out = fn(q, k, v)
        out.backward(grad)
        best = min(best, time.perf_counter() - t0)
    return best * LAYERS, [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as torch chose)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    result: dict = {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    result["shapes"] = {}
    for rows, length in ((4, 512), (2, 1024)):
        t_flash, ref = time_one(flash, rows, length, dtype, args.repeats)
        t_mm, got = time_one(matmul, rows, length, dtype, args.repeats)
        diff = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
        name = f"{rows}x{length}"
        result["shapes"][name] = {
            "flash_s": round(t_flash, 3),
            "matmul_s": round(t_mm, 3),
            "max_abs_diff": round(diff, 4),
        }
        print(
            f"{name}: flash {t_flash:.3f} s, matmul {t_mm:.3f} s a step ({LAYERS} layers, "
            f"forward + backward); largest difference {diff:.4f}",
            file=sys.stderr,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
