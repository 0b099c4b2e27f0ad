"""Stage 3: sample the policy with the user's system prompt -> results/prompt_engineering_results.json."""

from __future__ import annotations

from collections.abc import AsyncIterator

from engine.context import StageContext, StageError
from engine.events import Event, LogLine, StageFinished
from engine.sampling import open_sampler
from engine.stages._policy_samples import sample_demo_inputs

OUTPUT = "prompt_engineering_results.json"


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    demos = ws.load_demos()
    system_prompt = str(ws.load_prompts().get("system_prompt", "")).strip()
    if not system_prompt:
        raise StageError(
            f"{ws.rel(ws.prompts_path)}: system_prompt is empty; write one (Prompts & Rubric tab)."
        )
    yield LogLine(f"loading policy {ctx.model('policy')} on backend {ctx.backend}")
    sampler = await open_sampler(ctx, role="policy")
    out = ws.result(OUTPUT)
    async for ev in sample_demo_inputs(
        ctx, sampler, demos, out, system_prompt=system_prompt, source="prompting"
    ):
        yield ev
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(out),),
        summary=f"{len(demos)} outputs with the system prompt",
    )
