"""RLAIF step cost on the default model at local defaults, and how many round trips a step pays.

Runs ``rlaif`` for a few steps (init = base, no dev evaluation, no checkpoints between steps)
on a temporary workspace whose RL prompts are the example demonstrations' requests, twice:

1. against the local service as is: seconds per step split into sampling / judging /
   training (the stage's own time/* metrics; judging includes the initial policy's logprobs
   for the KL estimate, training includes the snapshot for the next step's sampler);
2. against the same service wrapped to add ``--latency`` seconds (default 0.2) to every call,
   as a remote service would: the extra seconds per step / latency = sequential round trips a
   step pays (pipelined requests overlap their latency), and the calls made per step.

Last line: JSON.  ``python bench/rlaif.py [--steps 2] [--latency 0.2]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from engine.llm.sampling import resolve  # noqa: E402
from engine.pipeline.runner import Runner, list_runs, load_run_events  # noqa: E402
from engine.run.events import Metric  # noqa: E402
from engine.store.results import rl_prompt_row  # noqa: E402
from engine.store.workspace import init_workspace  # noqa: E402

SYNC = {"get_tokenizer", "get_base_model", "get_info", "close", "create_rest_client"}


class Delayed:
    """A Tinker-style client whose every call pays ``delay`` seconds before its result
    arrives (the request itself is submitted at once, so submission order is kept). Clients
    returned by calls are wrapped too. ``counter["calls"]`` counts calls."""

    def __init__(self, inner: Any, delay: float, counter: dict[str, int]) -> None:
        self._inner, self._delay, self._counter = inner, delay, counter

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in SYNC or name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._counter["calls"] += 1
            out = attr(*args, **kwargs)
            # the latency runs from the call, as a network round trip would: requests
            # submitted together overlap their latency even when awaited one after another
            return asyncio.ensure_future(self._later(out))

        return call

    async def _later(self, out: Any) -> Any:
        await asyncio.sleep(self._delay)
        res = await resolve(out)
        if any(hasattr(res, m) for m in ("sample", "forward_backward")):
            return Delayed(res, self._delay, self._counter)
        return res


def make_workspace(root: Path) -> Any:
    ws = init_workspace(root)
    prompts = ws.load_prompts()
    rows = [
        rl_prompt_row(
            [
                {"role": "system", "content": prompts["system_prompt"].strip()},
                {"role": "user", "content": d["input"]},
            ],
            prompts["rubric"].strip(),
        )
        for d in ws.load_demos()
    ]
    ws.result("rl_train_data.jsonl").parent.mkdir(parents=True, exist_ok=True)
    ws.result("rl_train_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ws.result("rl_dev_data.jsonl").write_text("")
    return ws


async def one_run(ws: Any, delay: float | None, steps: int) -> dict[str, Any]:
    counter = {"calls": 0}
    factory = None
    if delay is not None:
        from engine.backends import make_service_client

        def factory(backend: str, *, checkpoint_dir: Path, env: dict[str, str]) -> Any:
            return Delayed(
                make_service_client(backend, checkpoint_dir=checkpoint_dir, env=env), delay, counter
            )

    runner = Runner(ws, service_factory=factory) if factory else Runner(ws)
    t0 = time.perf_counter()
    overrides = [
        f"rlaif.steps={steps}",
        'rlaif.init="base"',
        "rlaif.eval_every=0",
        "rlaif.checkpoint_every=0",
        "rlaif.sample_after=false",
    ]
    final = await runner.run("rlaif", overrides)
    wall = time.perf_counter() - t0
    runs = list_runs(ws, "rlaif")
    if not runs:
        raise SystemExit(f"rlaif did not start: {final}")
    run = runs[-1]
    m: dict[str, list[float]] = {}
    for e in load_run_events(run):
        if isinstance(e, Metric):
            m.setdefault(e.name, []).append(e.value)
    steps = len(m.get("time/sampling", []))
    split = {k: m[f"time/{k}"] for k in ("sampling", "judging", "training")}
    return {
        "finished": type(final).__name__ == "StageFinished",
        "wall_s": round(wall, 1),
        "steps": steps,
        "step_s": [round(sum(split[k][i] for k in split), 2) for i in range(steps)],
        "split_s": {k: [round(v, 2) for v in vs] for k, vs in split.items()},
        "sample_tokens": [round(v, 1) for v in m.get("rl/sample_tokens", [])],
        "unparsable_rate": [round(v, 2) for v in m.get("rl/unparsable_rate", [])],
        "calls": counter["calls"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.2)
    args = ap.parse_args()
    from engine.backends.local.hardware import cpu_model_name, cpu_supports_bf16

    kind = "AVX512_BF16 (bf16)" if cpu_supports_bf16() else "no AVX512_BF16 (fp32)"
    print(f"cpu: {cpu_model_name()} [{kind}], {os.cpu_count()} cores, {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "plain")
        plain = asyncio.run(one_run(ws, None, args.steps))
        print("plain:", plain)
        ws2 = make_workspace(Path(tmp) / "delayed")
        delayed = asyncio.run(one_run(ws2, args.latency, args.steps))
        print(f"+{args.latency}s per call:", delayed)

    # steps after the first (which includes warm-up) compare like with like
    def mean_tail(xs: list[float]) -> float:
        tail = xs[1:] or xs
        return sum(tail) / len(tail)

    extra = mean_tail(delayed["step_s"]) - mean_tail(plain["step_s"])
    result = {
        "bench": "rlaif",
        "cpu_bf16": cpu_supports_bf16(),
        "steps": args.steps,
        "step_s": round(mean_tail(plain["step_s"]), 2),
        "sampling_s": round(mean_tail(plain["split_s"]["sampling"]), 2),
        "judging_s": round(mean_tail(plain["split_s"]["judging"]), 2),
        "training_s": round(mean_tail(plain["split_s"]["training"]), 2),
        "latency_s": args.latency,
        "step_s_with_latency": round(mean_tail(delayed["step_s"]), 2),
        "round_trips_per_step": round(extra / args.latency, 1),
        "calls_per_run_with_latency": delayed["calls"],
        "note": "round trips = extra seconds per step / latency; noisy on a shared CPU",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
