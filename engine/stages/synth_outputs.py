"""Stage 5: the teacher answers each synthetic request under the system prompt.

-> results/synthetic_personalized_data.jsonl, one row per request, in the conversation
format tinker-cookbook's conversation datasets read:

    {"id": "in-0001", "seed": "...", "status": "pending",
     "messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}],
     "fixups": ["preamble", ...]}

Status: new rows get ``synth_outputs.default_status`` ("pending": not reviewed yet); the
review screen sets "accepted", "rejected" or "edited". Rows whose text is empty after the
fix-ups are "rejected" with a "reason". A rerun keeps rows the user already reviewed (same id
and request) and regenerates only the rest (auto-rejected rows included).

With ``synth_outputs.critique = true`` each answer is drafted, critiqued against the system
prompt, and revised; the draft is kept in the row.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from engine import jsonl
from engine.atomic import atomic_write_jsonl
from engine.context import StageContext, StageError
from engine.events import Event, LogLine, Metric, Progress, SampleProduced, StageFinished
from engine.fixups import fix_output
from engine.sampling import Sampler, as_completed_tasks, open_sampler
from engine.settings import SynthOutputsConfig
from engine.templates import fill
from engine.workspace import RESULT_FILES

OUTPUT = RESULT_FILES["synth-outputs"]
INPUTS = RESULT_FILES["synth-inputs"]
REVIEWED = ("accepted", "rejected", "edited")
STATUSES = ("pending", *REVIEWED)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The stage's strict read: a bad line fails the stage, naming file and line."""

    def on_bad(n: int, e: json.JSONDecodeError) -> None:
        raise StageError(f"{path.name}: line {n} is not valid JSON ({e.msg})") from e

    return jsonl.read_jsonl(path, on_bad)


def row_input(row: dict[str, Any]) -> str:
    for m in row.get("messages", []):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def row_output(row: dict[str, Any]) -> str:
    for m in reversed(row.get("messages", [])):
        if m.get("role") == "assistant":
            return str(m.get("content", ""))
    return ""


async def answer(
    sampler: Sampler,
    system_prompt: str,
    request: str,
    templates: dict[str, str],
    cfg: SynthOutputsConfig,
    seed: int,
) -> tuple[str, str | None]:
    """(final text, draft or None). Draft -> critique -> revise when cfg.critique."""
    kw = {
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
    }
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    draft = (
        await sampler.generate([*msgs, {"role": "user", "content": request}], seed=seed, **kw)
    )[0]
    if not cfg.critique:
        return draft, None
    critique = (
        await sampler.generate(
            [
                {
                    "role": "user",
                    "content": fill(
                        templates["critique"],
                        system_prompt=system_prompt,
                        request=request,
                        draft=draft,
                    ),
                }
            ],
            seed=seed + 1,
            **kw,
        )
    )[0]
    revised = (
        await sampler.generate(
            [
                *msgs,
                {
                    "role": "user",
                    "content": fill(
                        templates["revise"], request=request, draft=draft, critique=critique
                    ),
                },
            ],
            seed=seed + 2,
            **kw,
        )
    )[0]
    return (revised if revised.strip() else draft), draft


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    cfg = ctx.config.synth_outputs
    in_path = ws.result(INPUTS)
    if not in_path.exists():
        raise StageError(f"{ws.rel(in_path)} not found: run `persona run synth-inputs` first.")
    inputs = [r for r in read_jsonl(in_path) if str(r.get("input", "")).strip()]
    if cfg.limit > 0:
        inputs = inputs[: cfg.limit]
    if not inputs:
        raise StageError(f"{ws.rel(in_path)} has no requests: rerun `persona run synth-inputs`.")
    prompts = ws.load_prompts()
    system_prompt = str(prompts.get("system_prompt", "")).strip()
    default_status = cfg.default_status
    if default_status not in STATUSES:
        raise StageError(
            f"synth_outputs.default_status = {default_status!r}: choose one of {', '.join(STATUSES)}"
        )
    signoff = cfg.signoff

    out_path = ws.result(OUTPUT)
    kept: dict[tuple[str, str], dict[str, Any]] = {}
    if out_path.exists():
        for r in read_jsonl(out_path):
            if r.get("status") in REVIEWED and not r.get("reason"):  # auto-rejected rows are retried
                kept[(str(r.get("id")), row_input(r))] = r
    todo = [r for r in inputs if (str(r.get("id")), r["input"]) not in kept]
    if kept:
        yield LogLine(f"keeping {len(inputs) - len(todo)} reviewed rows; generating {len(todo)}")

    yield LogLine(
        f"loading teacher {ctx.model('teacher')} on backend {ctx.backend}"
        + (" (draft -> critique -> revise)" if cfg.critique else "")
    )
    sampler = await open_sampler(ctx, role="teacher")
    sem = asyncio.Semaphore(cfg.concurrency)
    seed0 = ctx.config.sampling.seed

    async def one(i: int, row: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with sem:
            ctx.check_cancel()
            text, draft = await answer(
                sampler, system_prompt, row["input"], prompts["templates"], cfg, seed0 + 10 * i
            )
        fixed, applied = fix_output(text, signoff)
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        out: dict[str, Any] = {
            "id": str(row.get("id", f"in-{i + 1:04d}")),
            "seed": row.get("seed", ""),
            "messages": [
                *msgs,
                {"role": "user", "content": row["input"]},
                {"role": "assistant", "content": fixed},
            ],
            "status": default_status,
            "fixups": applied,
        }
        if draft is not None:
            out["draft"] = draft
        if not fixed.strip():
            out["status"], out["reason"] = "rejected", "empty after fix-ups"
        return i, out

    results: dict[int, dict[str, Any]] = {}
    fixed_count = 0
    yield Progress(0, len(todo), "synth-outputs: answers")
    async with aclosing(as_completed_tasks(one(i, r) for i, r in enumerate(todo))) as answers:
        async for i, row in answers:
            results[i] = row
            fixed_count += bool(row["fixups"])
            yield SampleProduced(
                input=row_input(row), output=row_output(row), source="synth-outputs"
            )
            yield Progress(len(results), len(todo), "synth-outputs: answers")
            ctx.check_cancel()

    by_key = {(str(r.get("id")), r["input"]): results[i] for i, r in enumerate(todo)}
    rows = [
        kept.get((str(r.get("id")), r["input"])) or by_key[(str(r.get("id")), r["input"])]
        for r in inputs
    ]
    atomic_write_jsonl(out_path, rows)
    rejected = sum(r["status"] == "rejected" for r in rows)
    if todo:
        yield Metric("synth_outputs/fixup_rate", len(todo), fixed_count / len(todo))
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(out_path),),
        summary=f"{len(rows)} rows ({len(todo)} generated, {fixed_count} fixed up, {rejected} rejected); "
        f"new rows are {default_status!r}: review them in the Synthetic data tab",
    )
