"""Shared by baseline, prompting and sft: sample a policy on every demo input.

One demonstration that cannot be sampled (longer than the model's context, a backend error)
does not discard the others: every row that succeeded is written, then the stage fails with a
message naming the entry that did not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from engine.llm.sampling import Sampler, generate_many, sampling_kwargs
from engine.run.context import StageCancelled, StageContext, StageError
from engine.run.events import Event, LogLine, Progress, SampleProduced
from engine.store import results

HUGE = 10**7  # a tokenizer's model_max_length at or above this means "not set"


class _Guarded:
    """A sampler that records a failed generation (by its index) instead of raising."""

    def __init__(self, sampler: Sampler, seed0: int):
        self.sampler, self.seed0 = sampler, seed0
        self.failed: dict[int, str] = {}

    async def generate(self, msgs: list[dict[str, str]], *, seed: int, **kw: Any) -> list[str]:
        try:
            return await self.sampler.generate(msgs, seed=seed, **kw)
        except (StageCancelled, asyncio.CancelledError):
            raise
        except Exception as e:
            self.failed[seed - self.seed0] = f"{type(e).__name__}: {e}"[:300].rstrip(". ")
            return [""]


def _context_limit(sampler: Sampler) -> int | None:
    n = getattr(sampler.tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < HUGE else None


def _prompt_tokens(sampler: Sampler, msgs: list[dict[str, str]]) -> int:
    try:
        return int(sampler.renderer.build_generation_prompt(msgs).length)
    except Exception:  # a renderer without it: count the text itself
        return len(sampler.tokenizer.encode("\n".join(m["content"] for m in msgs)))


def _short(text: str, n: int = 50) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


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
    results.check_writable(out_path.parent)  # a read-only or full results/ fails now
    cfg = ctx.config.sampling
    kwargs = sampling_kwargs(cfg)
    convs = []
    for d in demos:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        convs.append([*msgs, {"role": "user", "content": d["input"]}])
    position = {d["input"]: k for k, d in enumerate(all_demos or demos, start=1)}
    failed: dict[int, str] = {}
    limit = _context_limit(sampler)
    if limit is not None:  # refuse, at once, a prompt the model cannot take
        room = limit - int(kwargs.get("max_tokens") or 0)
        for i, msgs in enumerate(convs):
            n = await asyncio.to_thread(_prompt_tokens, sampler, msgs)
            if n > room:
                failed[i] = (
                    f"its prompt is {n} tokens; {sampler.model} takes {limit} "
                    f"(less sampling.max_tokens={kwargs.get('max_tokens')}): shorten it"
                )
    todo = [i for i in range(len(demos)) if i not in failed]
    guarded = _Guarded(sampler, cfg.seed)
    outputs: list[str | None] = [None] * len(demos)
    yield Progress(0, len(todo), f"{source}: sampling")  # the same total as every step
    done = 0
    async for j, text in generate_many(
        ctx,
        guarded,  # type: ignore[arg-type] - duck-typed: generate() is all generate_many uses
        [convs[i] for i in todo],
        concurrency=cfg.concurrency,
        seed=cfg.seed,
        **kwargs,
    ):
        i = todo[j]
        done += 1
        if j in guarded.failed:
            failed[i] = guarded.failed[j]
        else:
            outputs[i] = text
            yield SampleProduced(input=demos[i]["input"], output=text, source=source)
        yield Progress(done, len(todo), f"{source}: sampling")
    rows = [
        {"input": d["input"], "expected_output": d["output"], "output": o}
        for d, o in zip(demos, outputs, strict=True)
        if o is not None
    ]
    empty = sum(1 for r in rows if not r["output"].strip())
    if empty:
        yield LogLine(
            f"{empty} of {len(rows)} outputs are empty (the model stopped at once)", "warning"
        )
    if all_demos is not None or failed:
        # keep earlier rows of demos not sampled now (or that failed now), in demo order
        by_input = {r["input"]: r for r in _previous_rows(out_path)}
        by_input.update({r["input"]: r for r in rows})
        order = all_demos if all_demos is not None else demos
        rows = [by_input[d["input"]] for d in order if d["input"] in by_input]
    rel = ctx.workspace.rel(out_path)
    if rows or not failed:
        results.write_method_outputs(out_path, rows)
        yield LogLine(f"wrote {rel} ({len(rows)} rows)")
    if failed:
        for i, why in sorted(failed.items()):
            entry = position.get(demos[i]["input"], i + 1)
            yield LogLine(
                f"data/data.json entry {entry} ({_short(demos[i]['input'])!r}) failed: {why}",
                "error",
            )
        i, why = min(failed.items())
        why = why.rstrip(". ")  # the sentence ends here: never ".."
        entry = position.get(demos[i]["input"], i + 1)
        raise StageError(
            f"{len(failed)} of {len(demos)} demonstrations could not be sampled; the first is "
            f"data/data.json entry {entry} ({len(demos[i]['input'])} characters): {why}. "
            f"The other {len(demos) - len(failed)} outputs were written to {rel}"
        )


def _previous_rows(path: Path) -> list[dict[str, str]]:
    return results.read_method_outputs(path).rows
