"""What every trained stage does the same way: save a checkpoint and record it.

sft, reward-model, rlaif and ditto each save the training state (adapter + optimizer, to
resume) and the sampler weights (to sample and to evaluate) under one name, then record both
in results/checkpoints.toml with the stage's own fields (fingerprint, step, held-out split,
...). Both saves are submitted before either is awaited: on Tinker that is one round trip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from engine.checkpoints import record_checkpoint
from engine.events import CheckpointSaved, Event, LogLine
from engine.sampling import resolve


async def save_checkpoint(
    ctx: Any, tc: Any, stage: str, name: str, *, step: int, **fields: Any
) -> CheckpointSaved:
    """Save state and sampler weights of training client ``tc`` as ``name``, record them under
    ``stage`` (with the run folder, the backend and ``fields``), and return the event."""
    state_future = tc.save_state(name)
    sampler_future = tc.save_weights_for_sampler(name)
    state, sampler = await resolve(state_future), await resolve(sampler_future)
    record_checkpoint(
        ctx.workspace.results_dir,
        stage,
        sampler_path=str(sampler.path),
        state_path=str(state.path),
        step=step,
        run=ctx.workspace.rel(ctx.run_dir),
        backend=ctx.backend,
        **fields,
    )
    return CheckpointSaved(
        name=name, step=step, sampler_path=str(sampler.path), state_path=str(state.path)
    )


def step_name(step: int) -> str:
    """The name of a periodic checkpoint (``final`` is the last one)."""
    return f"step-{step:06d}"


async def cancel_checkpoint(
    save: Callable[[int, str, bool], Awaitable[CheckpointSaved]],
    step: int,
    last_saved: int,
    total_steps: int,
) -> AsyncIterator[Event]:
    """On cancel: save the steps done since the last checkpoint, so a rerun loses none."""
    if step > last_saved:
        yield await save(step, step_name(step), False)
        yield LogLine(f"cancelled at step {step}/{total_steps}; checkpoint saved, rerun to resume")
