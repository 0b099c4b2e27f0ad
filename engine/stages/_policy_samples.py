"""Shared by baseline, prompting and sft: sample a policy on every demo input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from engine.atomic import atomic_write_json
from engine.context import StageContext
from engine.events import Event, LogLine, Progress, SampleProduced
from engine.sampling import Sampler, generate_many, sampling_kwargs


async def sample_demo_inputs(
    ctx: StageContext,
    sampler: Sampler,
    demos: list[dict[str, str]],
    out_path: Path,
    *,
    system_prompt: str | None,
    source: str,
) -> AsyncIterator[Event]:
    """Sample ``sampler`` on each demo input, stream the samples, write ``out_path`` atomically at the end."""
    cfg = ctx.section("sampling")
    kwargs = sampling_kwargs(cfg)
    convs = []
    for d in demos:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        convs.append([*msgs, {"role": "user", "content": d["input"]}])
    outputs: list[str | None] = [None] * len(demos)
    yield Progress(0, len(demos), f"{source}: sampling")
    done = 0
    async for i, text in generate_many(
        ctx,
        sampler,
        convs,
        concurrency=int(cfg.get("concurrency", 16)),
        seed=int(cfg.get("seed", 0)),
        **kwargs,
    ):
        outputs[i] = text
        done += 1
        yield SampleProduced(input=demos[i]["input"], output=text, source=source)
        yield Progress(done, len(demos), f"{source}: sampling")
    rows = [
        {"input": d["input"], "expected_output": d["output"], "output": o or ""}
        for d, o in zip(demos, outputs, strict=True)
    ]
    empty = sum(1 for r in rows if not r["output"].strip())
    if empty:
        yield LogLine(
            f"{empty} of {len(rows)} outputs are empty (the model stopped at once)", "warning"
        )
    atomic_write_json(out_path, rows)
    yield LogLine(f"wrote {ctx.workspace.rel(out_path)} ({len(rows)} rows)")
