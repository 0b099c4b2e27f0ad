"""Stage 1: validate the demonstrations (data/data.json). Writes nothing; reports problems."""

from __future__ import annotations

from collections.abc import AsyncIterator

from engine.run.context import StageContext
from engine.run.events import Event, LogLine, Metric, StageFinished


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    demos = ws.load_demos()  # raises WorkspaceError naming file, entry and problem
    prompts = ws.load_prompts()
    words = [len(d["output"].split()) for d in demos]
    yield Metric("demos/count", 0, float(len(demos)))
    yield LogLine(
        f"{len(demos)} demonstrations OK; outputs {min(words)}–{max(words)} words "
        f"(mean {sum(words) / len(words):.0f}); {len(prompts['seeds'])} topic seeds"
    )
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(ws.demos_path),),
        summary=f"{len(demos)} demonstrations valid",
    )
