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
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from engine.llm.fixups import fix_output
from engine.llm.sampling import Sampler, as_completed_tasks, open_sampler
from engine.run.context import StageContext, StageError
from engine.run.events import Event, LogLine, Metric, Progress, SampleProduced, StageFinished
from engine.store import results
from engine.store.results import RESULT_FILES, Loaded, row_input, row_output  # noqa: F401 - re-exported
from engine.store.settings import SynthOutputsConfig
from engine.store.templates import fill

OUTPUT = RESULT_FILES["synth-outputs"]
INPUTS = RESULT_FILES["synth-inputs"]
REVIEWED = results.REVIEWED
STATUSES = results.SYNTH_STATUSES


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A strict read of a synthetic rows file: a bad line fails the stage, naming file and line."""
    return results.read_synthetic_rows(path).strict()


def warn_bad(loaded: Loaded, what: str, limit: int = 5) -> list[LogLine]:
    """Log lines naming each skipped line of a results file (the first ``limit``)."""
    lines = [LogLine(f"{p} ({what})", "warning") for p in loaded.problems[:limit]]
    if len(loaded.problems) > limit:
        lines.append(LogLine(f"... and {len(loaded.problems) - limit} more such lines", "warning"))
    return lines


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
    results.check_writable(ws.results_dir)  # a read-only or full results/ fails now, not at the end
    loaded_inputs = results.read_synthetic_inputs(in_path)
    if loaded_inputs.error:
        raise StageError(loaded_inputs.error)
    for ev in warn_bad(loaded_inputs, "skipped"):
        yield ev
    inputs = [r for r in loaded_inputs.rows if r["input"].strip()]
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
    existing = results.read_synthetic_rows(out_path)
    for ev in warn_bad(existing, "kept as is at the end of the file"):
        yield ev
    # what was on disk when we began: the final write keeps any review saved meanwhile
    started_from = {results.row_key(r): r for r in existing.rows}
    kept: dict[tuple[str, str], dict[str, Any]] = {
        k: r for k, r in started_from.items() if results.is_review_decision(r)
    }  # auto-rejected rows are retried
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

    answered: dict[int, dict[str, Any]] = {}
    fixed_count = 0
    yield Progress(0, len(todo), "synth-outputs: answers")
    async with aclosing(as_completed_tasks(one(i, r) for i, r in enumerate(todo))) as answers:
        async for i, row in answers:
            answered[i] = row
            fixed_count += bool(row["fixups"])
            yield SampleProduced(
                input=row_input(row), output=row_output(row), source="synth-outputs"
            )
            yield Progress(len(answered), len(todo), "synth-outputs: answers")
            ctx.check_cancel()

    by_key = {(str(r.get("id")), r["input"]): answered[i] for i, r in enumerate(todo)}
    rows = [
        kept.get((str(r.get("id")), r["input"])) or by_key[(str(r.get("id")), r["input"])]
        for r in inputs
    ]
    report = results.write_synthetic_rows(out_path, rows, started_from=started_from)
    if report.merged_from_disk:
        yield LogLine(
            f"kept {report.merged_from_disk} review decision(s) saved while this stage ran"
        )
    rows = results.read_synthetic_rows(out_path).rows
    rejected = sum(r.get("status") == "rejected" for r in rows)
    if todo:
        yield Metric("synth_outputs/fixup_rate", len(todo), fixed_count / len(todo))
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(out_path),),
        summary=f"{len(rows)} rows ({len(todo)} generated, {fixed_count} fixed up, {rejected} rejected); "
        f"new rows are {default_status!r}: review them in the Synthetic data tab",
    )
