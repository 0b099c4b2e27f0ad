"""The local backend's compute on a GPU: training and sampling tokens/s.

Runs where tinker may be missing (a lent GPU machine): it drives ``BaseRuntime`` directly,
the same code the service's worker runs. The model is SmolLM2-135M's shape with random
weights, built from ``config.json`` (speed does not depend on the weights' values), so only
the config and tokenizer files need to travel:

    python3 bench/local_gpu.py --model-dir DIR     # DIR holds config.json + tokenizer files
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import types as pytypes
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import tinker  # noqa: F401
except ImportError:  # import the compute modules without the package's tinker-facing __init__
    pkg = pytypes.ModuleType("engine.backends.local")
    pkg.__path__ = [str(ROOT / "engine" / "backends" / "local")]
    sys.modules["engine.backends.local"] = pkg

import torch  # noqa: E402

PROMPT = "The history of the city begins in the early morning of a cold winter day, when"


def build_model(src: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.startswith("special_tokens"):
            shutil.copy(f, out / f.name)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from transformers import AutoModelForCausalLM

    from engine.backends.local.compute import BaseRuntime, GenRow, make_generator
    from engine.backends.local.lora import LoraSpec, targets_for
    from engine.backends.local.models import choose_compute

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    model_dir = build_model(Path(args.model_dir), Path("/tmp/persona-gpu-model"))
    plan = choose_compute()
    rt = BaseRuntime(str(model_dir), plan)
    dev = rt.device
    out: dict = {"device": str(dev), "dtype": plan.dtype_name, "torch": torch.__version__}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()

    # Training: LoRA r16 on every linear layer, 4 x 512 and a 50..700 variable-length batch.
    rt.host.add(
        "train", LoraSpec(16, 32.0, targets_for(True, True, True)), torch.Generator().manual_seed(0)
    )
    opt = torch.optim.AdamW(rt.host.parameters("train"), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def train(rows: list[list[int]]) -> float:
        sync(dev)
        t = time.perf_counter()
        for _, logps in rt.microbatched_logprobs(
            "train", [r[:-1] for r in rows], [r[1:] for r in rows], grad=True
        ):
            (-sum(lp.sum() for lp in logps)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        return time.perf_counter() - t

    for name, lengths in (("4x512", [513] * 4), ("varlen", [445, 481, 92, 316, 574, 548])):
        rows = [torch.randint(3, rt.vocab_size, (n,), generator=g).tolist() for n in lengths]
        train(rows)
        dts = [train(rows) for _ in range(args.steps)]
        out[f"train_{name}_tokens_per_s"] = round(
            sum(n - 1 for n in lengths) * len(dts) / sum(dts), 1
        )
    if dev.type == "cuda":
        out["train_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)

    # Sampling from the base model: ours vs plain generate, same dtype, prompt and length.
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=rt.dtype).to(dev).eval()
    prompt = rt.tokenizer.encode(PROMPT)
    T = args.max_tokens

    def ours(n: int) -> float:
        rows = [
            GenRow(prompt, T, 1.0, 1.0, -1, frozenset(), (), make_generator(n)) for _ in range(n)
        ]
        sync(dev)
        t = time.perf_counter()
        res = rt.generate(None, rows)
        sync(dev)
        return sum(len(r.tokens) for r in res) / (time.perf_counter() - t)

    def theirs(n: int) -> float:
        ids = torch.tensor([prompt] * n, device=dev)
        sync(dev)
        t = time.perf_counter()
        with torch.no_grad():
            o = plain.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=T,
                min_new_tokens=T,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=2,
            )
        sync(dev)
        return (o.shape[1] - len(prompt)) * n / (time.perf_counter() - t)

    sampling = {}
    for n in (1, 8, 32, 64):
        ours(n), theirs(n)
        a, b = [ours(n) for _ in range(2)], [theirs(n) for _ in range(2)]
        sampling[str(n)] = {
            "ours_tokens_per_s": round(max(a), 1),
            "generate_tokens_per_s": round(max(b), 1),
            "ratio": round(max(a) / max(b), 2),
        }
        print(n, sampling[str(n)], flush=True)
    out["sampling"] = sampling
    print(json.dumps(out))


if __name__ == "__main__":
    main()
