"""Stage 3: sample the policy with the user's system prompt -> results/prompt_engineering_results.json.

``prompting.only = [i, ...]`` samples just those demonstrations (0-based) and keeps the other
rows of the results file: the Prompts tab's "try it" uses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from engine.llm.sampling import open_sampler
from engine.run.context import StageContext, StageError
from engine.run.events import Event, LogLine, StageFinished
from engine.stages._policy_samples import sample_demo_inputs
from engine.store.results import RESULT_FILES

OUTPUT = RESULT_FILES["prompting"]


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    demos = ws.load_demos()
    system_prompt = str(ws.load_prompts().get("system_prompt", "")).strip()
    if not system_prompt:
        raise StageError(
            f"{ws.rel(ws.prompts_path)}: system_prompt is empty; write one (Prompts & Rubric tab)."
        )
    only = _only(list(ctx.config.prompting.only), len(demos))
    chosen = [demos[i] for i in only] if only else demos
    yield LogLine(f"loading policy {ctx.model('policy')} on backend {ctx.backend}")
    sampler = await open_sampler(ctx, role="policy")
    out = ws.result(OUTPUT)
    async for ev in sample_demo_inputs(
        ctx,
        sampler,
        chosen,
        out,
        system_prompt=system_prompt,
        source="prompting",
        all_demos=demos if only else None,
    ):
        yield ev
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(out),),
        summary=f"{len(chosen)} outputs with the system prompt",
    )


def _only(value: object, count: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise StageError(
            f"prompting.only = {value!r}: give a list of demonstration numbers, e.g. [0, 3]."
        )
    bad = [i for i in value if not 0 <= i < count]
    if bad:
        raise StageError(
            f"prompting.only: demonstration {bad[0]} does not exist (there are {count}, numbered 0-{count - 1})."
        )
    return list(dict.fromkeys(value))
