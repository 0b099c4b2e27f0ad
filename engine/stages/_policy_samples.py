"""Shared by baseline, prompting and sft: sample a policy on every demo input."""

from __future__ import annotations

import json
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
    all_demos: list[dict[str, str]] | None = None,
) -> AsyncIterator[Event]:
    """Sample ``sampler`` on each demo input, stream the samples, write ``out_path`` atomically at the end.

    With ``all_demos`` (a run on some of them), the other demos' earlier rows in ``out_path``
    are kept, in the order of ``all_demos``.
    """
    cfg = ctx.config.sampling
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
        concurrency=cfg.concurrency,
        seed=cfg.seed,
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
    if all_demos is not None:
        by_input = {r["input"]: r for r in _previous_rows(out_path)}
        by_input.update({r["input"]: r for r in rows})
        rows = [by_input[d["input"]] for d in all_demos if d["input"] in by_input]
    atomic_write_json(out_path, rows)
    yield LogLine(f"wrote {ctx.workspace.rel(out_path)} ({len(rows)} rows)")


def _previous_rows(path: Path) -> list[dict[str, str]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("input"), str)]
