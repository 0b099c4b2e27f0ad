"""Stage 2: sample the base policy on every demo input -> results/baseline_results.json."""

from __future__ import annotations

from collections.abc import AsyncIterator

from engine.llm.sampling import open_sampler
from engine.run.context import StageContext
from engine.run.events import Event, LogLine, StageFinished
from engine.stages._policy_samples import sample_demo_inputs
from engine.store.results import RESULT_FILES

OUTPUT = RESULT_FILES["baseline"]


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    demos = ws.load_demos()
    yield LogLine(f"loading policy {ctx.model('policy')} on backend {ctx.backend}")
    sampler = await open_sampler(ctx, role="policy")
    out = ws.result(OUTPUT)
    async for ev in sample_demo_inputs(
        ctx, sampler, demos, out, system_prompt=None, source="baseline"
    ):
        yield ev
    yield StageFinished(
        stage=ctx.stage, outputs=(ws.rel(out),), summary=f"{len(demos)} baseline outputs"
    )
