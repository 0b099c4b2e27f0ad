"""Stage 4: the teacher writes new requests like the demos, ``per_seed`` per topic seed.

-> results/synthetic_inputs.jsonl, one ``{"id", "seed", "input"}`` per line.

Each seed is asked once, then retried (``retries``) while it is short. Replies are parsed
leniently; engine.llm.parsing.RequestFilter keeps only lines that read as requests and drops
exact and near duplicates (also of the demos), counting filtered and duplicate lines apart.
Yield = valid requests / requests asked, reported as metric ``synth_inputs/yield``. A low
yield is reported, not fatal; zero is fatal with a message saying what to change.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import aclosing

from engine.llm.parsing import RequestFilter
from engine.llm.sampling import as_completed_tasks, open_sampler
from engine.run.context import StageContext, StageError
from engine.run.events import Event, LogLine, Metric, Progress, StageFinished
from engine.store import results
from engine.store.results import RESULT_FILES, TEACHER_REPLIES_FILE
from engine.store.templates import fill

OUTPUT = RESULT_FILES["synth-inputs"]


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    cfg = ctx.config.synth_inputs
    split = ctx.split()
    demos = split.train  # the teacher never sees a held-out demonstration
    if split.warning:
        yield LogLine(split.warning, "warning")
    prompts = ws.load_prompts()
    seeds = list(prompts["seeds"])
    if cfg.max_seeds > 0:
        seeds = seeds[: cfg.max_seeds]
    per_seed = cfg.per_seed
    retries = cfg.retries
    n_examples = min(cfg.num_examples, len(demos))
    template = prompts["templates"]["synth_inputs"]
    asked = per_seed * len(seeds)
    rng = random.Random(ctx.config.sampling.seed)

    yield LogLine(f"loading teacher {ctx.model('teacher')} on backend {ctx.backend}")
    sampler = await open_sampler(ctx, role="teacher")
    # never echo a demonstration back (held-out ones included); count what is dropped
    request_filter = RequestFilter([d["input"] for d in split.train + split.holdout])
    results.check_writable(ws.results_dir)  # a read-only or full results/ fails now, not at the end
    sem = asyncio.Semaphore(cfg.concurrency)
    gen_kwargs = {
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": ctx.config.sampling.top_p,
    }
    examples_per_seed = [rng.sample(demos, n_examples) for _ in seeds]
    updates: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    planned = len(seeds)  # teacher requests: one per seed, one more per retry once asked

    async def one_seed(si: int, seed: str) -> tuple[int, list[str], int]:
        nonlocal planned
        got: list[str] = []
        attempts = 0
        for attempt in range(1 + retries):
            ctx.check_cancel()
            need = per_seed - len(got)
            if need <= 0:
                break
            attempts += 1
            if attempt:
                planned += 1
            examples = "\n".join(
                f"{k + 1}. {d['input']}" for k, d in enumerate(examples_per_seed[si])
            )
            prompt = fill(template, examples=examples, seed=seed, n=need)
            async with sem:
                ctx.check_cancel()
                texts = await sampler.generate(
                    [{"role": "user", "content": prompt}],
                    seed=1000 * si + attempt,
                    trim_repeats=False,
                    **gen_kwargs,
                )
            reply = texts[0] if texts else ""
            results.append_teacher_reply(ctx.run_dir, seed, attempt, reply)
            got.extend(request_filter.take(reply, need))
            updates.put_nowait(("reply", None))
        return si, got, attempts

    rows: list[dict[str, str]] = []
    per_seed_results: dict[int, list[str]] = {}

    async def drive() -> None:  # seeds as they finish, beside the replies, into one queue
        try:
            seed_jobs = as_completed_tasks(one_seed(i, s) for i, s in enumerate(seeds))
            async with aclosing(seed_jobs) as finished:
                async for result in finished:
                    updates.put_nowait(("seed", result))
        except BaseException as e:
            updates.put_nowait(("error", e))
            raise

    driver = asyncio.ensure_future(drive())
    valid = done = replies = 0
    yield Progress(0, planned, "synth-inputs: teacher replies")
    try:
        while done < len(seeds):
            kind, item = await updates.get()
            if kind == "error":
                raise item
            if kind == "reply":  # progress moves per request finished, not per seed
                replies += 1
                yield Progress(replies, planned, "synth-inputs: teacher replies")
                continue
            si, got, attempts = item
            done += 1
            per_seed_results[si] = got
            valid += len(got)
            yield LogLine(
                f"seed {seeds[si]!r}: {len(got)}/{per_seed} requests in {attempts} attempt(s)"
            )
            yield Metric("synth_inputs/yield", done, valid / (per_seed * done))
    finally:
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)

    for si, seed in enumerate(seeds):
        for text in per_seed_results.get(si, []):
            rows.append({"id": f"in-{len(rows) + 1:04d}", "seed": seed, "input": text})
    total_yield = len(rows) / asked if asked else 0.0
    yield Metric("synth_inputs/valid", len(seeds), float(len(rows)))
    yield Metric("synth_inputs/filtered", len(seeds), float(request_filter.filtered))
    yield Metric("synth_inputs/duplicates", len(seeds), float(request_filter.duplicates))
    yield LogLine(f"teacher lines: {request_filter.summary()}")
    if not rows:
        raise StageError(
            f"The teacher ({ctx.model('teacher')}) produced no usable requests (yield 0/{asked}). "
            "Try a stronger teacher (models.teacher, or --backend tinker), more retries "
            "(--set synth_inputs.retries=4) or a larger synth_inputs.max_tokens. Raw replies: "
            f"{ws.rel(ctx.run_dir / TEACHER_REPLIES_FILE)}"
        )
    out = ws.result(OUTPUT)
    results.write_synthetic_inputs(out, rows)
    if total_yield < 0.5:
        yield LogLine(
            f"low yield {len(rows)}/{asked} ({total_yield:.0%}): the teacher's replies were hard to parse. "
            "A stronger teacher gives more.",
            "warning",
        )
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(out),),
        summary=(
            f"{len(rows)} requests, yield {len(rows)}/{asked} = {total_yield:.0%}; "
            f"{request_filter.filtered} lines filtered, {request_filter.duplicates} duplicates"
        ),
    )
