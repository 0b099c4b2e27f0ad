"""Whether the judge can tell the person's writing from a model's: ground truth without a human.

On each held-out demonstration the person's real text should beat a model's sample for the
same request. The samples are the base policy's and the few-shot policy's (the training
demonstrations as earlier turns, as evaluate's few-shot method), ``ACCURACY_SAMPLES`` of each
per held-out request, drawn once per held-out set, policy and sampling settings and kept in
results/judge_accuracy_samples.json so every later check (f10 included) judges the same
texts. :func:`engine.judge.person_accuracy` turns the judge's verdicts on them into
accuracies with Wilson intervals.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from engine.llm.sampling import open_sampler
from engine.run.context import StageContext
from engine.run.train_run import digest
from engine.store.atomic import atomic_write_json
from engine.store.results import JUDGE_ACCURACY_FILE

# Samples per held-out request and comparator: with two held-out demonstrations that is
# n = 8 per comparator, where 8 of 8 right has a Wilson interval above 0.5 (0.68-1.0);
# with one sample each even a perfect judge could not be told from chance.
ACCURACY_SAMPLES = 4

Case = tuple[list[dict[str, str]], str, str]  # (conversation, person's text, a model's text)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def few_shot_turns(train: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The training demonstrations as earlier user/assistant turns (evaluate's few-shot)."""
    turns: list[dict[str, str]] = []
    for d in train:
        turns += [
            {"role": "user", "content": d["input"]},
            {"role": "assistant", "content": d["output"]},
        ]
    return turns


def _cases(rows: list[dict[str, Any]]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {"vs_base": [], "vs_few_shot": []}
    for r in rows:
        text = str(r.get("sample", "")).strip()
        if r.get("kind") in out and text and text != str(r.get("person", "")).strip():
            out[r["kind"]].append((_user(str(r["input"])), str(r["person"]), text))
    return out


async def heldout_cases(ctx: StageContext) -> tuple[dict[str, list[Case]], bool]:
    """The held-out cases ``{"vs_base": [...], "vs_few_shot": [...]}`` and whether they were
    sampled now (False: read from results/judge_accuracy_samples.json). Empty without a
    held-out demonstration."""
    split = ctx.split()
    held, train = split.holdout, split.train
    if not held:
        return {"vs_base": [], "vs_few_shot": []}, False
    s = ctx.config.sampling
    settings = [s.max_tokens, s.temperature, s.top_p, s.trim_repeats, ACCURACY_SAMPLES]
    key = digest([held, train, ctx.model("policy"), ctx.backend, settings])
    ws = ctx.workspace
    path = ws.result(JUDGE_ACCURACY_FILE)
    # a workspace that writes elsewhere (the Prompts tab's rubric check) still reads the
    # samples the reward-model stage drew
    for candidate in dict.fromkeys((path, ws.results_dir / JUDGE_ACCURACY_FILE)):
        try:
            cached = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cached, dict) and cached.get("key") == key:
            return _cases(cached.get("rows") or []), False
    sampler = await open_sampler(ctx, role="policy")
    few = few_shot_turns(train)
    kw = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p}
    jobs = [
        (kind, d, sampler.generate(
            context + _user(d["input"]), num_samples=ACCURACY_SAMPLES,
            seed=1_000 + r, trim_repeats=s.trim_repeats, **kw,
        ))
        for r, d in enumerate(held)
        for kind, context in (("vs_base", []), ("vs_few_shot", few))
    ]  # fmt: skip
    results = await asyncio.gather(*(j[2] for j in jobs))
    rows = [
        {"kind": kind, "input": d["input"], "person": d["output"], "sample": text}
        for (kind, d, _job), texts in zip(jobs, results, strict=True)
        for text in texts
    ]
    atomic_write_json(path, {"key": key, "rows": rows})
    return _cases(rows), True
