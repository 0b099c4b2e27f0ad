"""Stage 8: the teacher writes many more requests for RL; split them train/dev.

-> results/rl_train_data.jsonl and results/rl_dev_data.jsonl, one
``{"prompt_conversation", "reference": null, "rubric"}`` per line. Train rows carry the system
prompt as their first message; dev rows do not (the seed's rule: the dev evaluator measures
the policy without it).

``rl_prompts.teacher_calls`` calls (0 = 200 on Tinker, 12 locally), each asking for
``per_call`` requests on one random topic seed with ONE random training demonstration as the
example (held-out demonstrations are never shown). Replies are parsed leniently and go
through engine.llm.parsing.RequestFilter: a line counts only if it reads as a request, and exact
and near duplicates (of each other or of any demonstration) are dropped. Yield (accepted /
asked), filtered and duplicate counts are reported separately.
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
from engine.store.results import (
    RL_DEV_FILE,
    RL_TRAIN_FILE,
    append_teacher_reply,
    rl_prompt_row,
    write_rl_prompts,
)
from engine.store.templates import fill

OUTPUT = RL_TRAIN_FILE
DEV_OUTPUT = RL_DEV_FILE
DEFAULT_CALLS = {"tinker": 200, "local": 12}


def teacher_calls(ctx: StageContext) -> int:
    n = ctx.config.rl_prompts.teacher_calls
    return n if n > 0 else DEFAULT_CALLS.get(ctx.backend, 12)


def split_rows(
    requests: list[str], system_prompt: str, rubric: str, dev_size: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """Shuffle (seeded), keep ``dev_size`` for dev (at most half), the rest for training."""
    order = list(requests)
    random.Random(seed).shuffle(order)
    n_dev = min(dev_size, len(order) // 2)
    dev = [rl_prompt_row([{"role": "user", "content": r}], rubric) for r in order[:n_dev]]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    train = [
        rl_prompt_row([*system, {"role": "user", "content": r}], rubric) for r in order[n_dev:]
    ]
    return train, dev


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    cfg = ctx.config.rl_prompts
    split = ctx.split()
    if split.warning:
        yield LogLine(split.warning, "warning")
    demos = split.train  # the teacher never sees a held-out demonstration
    if not demos:
        raise StageError("No training demonstrations: add some in the Demonstrations tab.")
    prompts = ws.load_prompts()
    seeds = list(prompts["seeds"])
    template = prompts["templates"].get("rl_prompts") or prompts["templates"]["synth_inputs"]
    system_prompt = str(prompts.get("system_prompt", "")).strip()
    rubric = str(prompts.get("rubric", "")).strip()
    calls = teacher_calls(ctx)
    asked = calls * cfg.per_call
    rng = random.Random(ctx.config.sampling.seed)
    plan = [(rng.choice(seeds), rng.choice(demos)["input"]) for _ in range(calls)]

    yield LogLine(
        f"{calls} teacher calls of {cfg.per_call} requests on {ctx.model('teacher')} ({ctx.backend})"
    )
    sampler = await open_sampler(ctx, role="teacher")
    request_filter = RequestFilter([d["input"] for d in split.train + split.holdout])
    sem = asyncio.Semaphore(cfg.concurrency)

    async def one_call(k: int) -> tuple[int, str]:
        seed, example = plan[k]
        prompt = fill(template, examples=f"1. {example}", seed=seed, n=cfg.per_call)
        async with sem:
            ctx.check_cancel()
            texts = await sampler.generate(
                [{"role": "user", "content": prompt}],
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=ctx.config.sampling.top_p,
                seed=ctx.config.sampling.seed * 100_003 + k,
                trim_repeats=False,
            )
        return k, texts[0] if texts else ""

    requests: list[str] = []
    done = 0
    yield Progress(0, calls, "rl-prompts: teacher calls")
    async with aclosing(as_completed_tasks(one_call(k) for k in range(calls))) as results:
        async for k, reply in results:
            append_teacher_reply(ctx.run_dir, plan[k][0], k, reply)
            requests.extend(request_filter.take(reply, cfg.per_call))
            done += 1
            yield Metric("rl_prompts/yield", done, len(requests) / (done * cfg.per_call))
            yield Progress(done, calls, "rl-prompts: teacher calls")
            ctx.check_cancel()
    yield Metric("rl_prompts/accepted", calls, float(request_filter.accepted))
    yield Metric("rl_prompts/filtered", calls, float(request_filter.filtered))
    yield Metric("rl_prompts/duplicates", calls, float(request_filter.duplicates))
    yield LogLine(f"teacher lines: {request_filter.summary()}")
    if len(requests) < 2:
        raise StageError(
            f"The teacher ({ctx.model('teacher')}) produced {len(requests)} usable request(s) "
            f"of {asked} asked. Try a stronger teacher (models.teacher, or --backend tinker), "
            "more calls (--set rl_prompts.teacher_calls=40) or a larger rl_prompts.max_tokens. "
            f"Raw replies: {ws.rel(ctx.run_dir / 'teacher_replies.jsonl')}"
        )
    train, dev = split_rows(requests, system_prompt, rubric, cfg.dev_size, ctx.config.sampling.seed)
    if len(dev) < cfg.dev_size:
        yield LogLine(f"only {len(dev)} dev prompts (asked for {cfg.dev_size})", "warning")
    out, dev_out = ws.result(OUTPUT), ws.result(DEV_OUTPUT)
    write_rl_prompts(out, train)
    write_rl_prompts(dev_out, dev)
    rate = len(requests) / asked
    if rate < 0.5:
        yield LogLine(
            f"low yield {len(requests)}/{asked} ({rate:.0%}); a stronger teacher gives more",
            "warning",
        )
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(out), ws.rel(dev_out)),
        summary=(
            f"{len(train)} train / {len(dev)} dev prompts; yield {len(requests)}/{asked} = "
            f"{rate:.0%}; {request_filter.filtered} lines filtered, "
            f"{request_filter.duplicates} duplicates removed"
        ),
    )
