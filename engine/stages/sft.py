"""Stage 6: LoRA SFT of the policy on the reviewed synthetic pairs, then sample it on the demos.

Which rows train (``sft.train_on``):
  "auto" (default)  accepted + edited rows; when none are reviewed yet, every row that is
                    not rejected (pending included), and the log says so.
  "reviewed"        accepted + edited only (fails when there are none).
  "non-rejected"    every row except rejected ones.

Loss: the renderer's supervised example (weights on the assistant reply only), cross-entropy.
The service returns summed losses, so ``train/loss`` and ``val/loss`` are the per-token mean
NLL: -sum(logprob * weight) / sum(weight).

Checkpoints every ``checkpoint_every`` steps, on cancel, and at the end, recorded in
results/checkpoints.toml under [sft] (engine.run.train_run: a rerun reuses a finished training of
the same data and settings and only samples, resumes an unfinished one, continues one whose
steps grew, and otherwise trains from the start, saying why; ``--set sft.resume=false``
always starts over).

Rows longer than ``sft.max_length`` tokens are cut (``sft.too_long = "cut"``, the default) or
left out (``"drop"``); how many and by how much is logged and put in the run's summary.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import tinker

from engine.llm.sampling import open_sampler, resolve
from engine.run.context import StageContext, StageError
from engine.run.events import CheckpointSaved, Event, LogLine, Metric, StageFinished
from engine.run.supervised import batch_indices, mean_nll, supervised_step
from engine.run.train_run import Decision, TrainRun, adam, digest, section_settings
from engine.stages._policy_samples import sample_demo_inputs
from engine.stages.synth_outputs import warn_bad
from engine.store import results
from engine.store.results import RESULT_FILES, registry_path
from engine.store.split import split_fingerprint

OUTPUT = RESULT_FILES["sft"]
DATA_FILE = RESULT_FILES["synth-outputs"]


def select_rows(rows: list[dict[str, Any]], train_on: str) -> tuple[list[dict[str, Any]], str]:
    reviewed = [r for r in rows if r.get("status") in ("accepted", "edited")]
    non_rejected = [r for r in rows if r.get("status") != "rejected"]
    if train_on == "reviewed":
        return reviewed, f"{len(reviewed)} accepted/edited rows"
    if train_on == "non-rejected":
        return non_rejected, f"{len(non_rejected)} non-rejected rows"
    if train_on != "auto":
        raise StageError(f"sft.train_on = {train_on!r}: choose auto, reviewed or non-rejected")
    if reviewed:
        return reviewed, f"{len(reviewed)} accepted/edited rows (of {len(rows)})"
    return non_rejected, (
        f"no rows reviewed yet: training on all {len(non_rejected)} non-rejected rows (pending included). "
        'Review them in the Synthetic data tab, or set sft.train_on="reviewed" to require review'
    )


def conversation(row: dict[str, Any], use_system: bool) -> list[dict[str, str]]:
    msgs = [
        {"role": m["role"], "content": str(m.get("content", ""))}
        for m in row.get("messages", [])
        if m.get("role") in ("system", "user", "assistant")
    ]
    if not use_system:
        msgs = [m for m in msgs if m["role"] != "system"]
    return msgs


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    cfg = ctx.config.sft
    data_path = ws.result(DATA_FILE)
    if not data_path.exists():
        raise StageError(f"{ws.rel(data_path)} not found: run `persona run synth-outputs` first.")
    loaded = results.read_synthetic_rows(data_path)
    if loaded.error:
        raise StageError(loaded.error)
    for ev in warn_bad(loaded, "skipped: not used for training"):
        yield ev
    convs, how = training_conversations(loaded.rows, cfg)
    if not convs:
        raise StageError(
            f"No training rows in {ws.rel(data_path)} ({how}). Accept some rows in the Synthetic data tab "
            "or rerun synth-outputs."
        )
    yield LogLine(f"training on {how}", "warning" if how.startswith("no rows") else "info")
    results.check_writable(ws.results_dir)  # a read-only or full results/ fails now, not at the end

    plan = plan_training(convs, cfg)
    model = ctx.model("policy")
    train_run = train_run_for(ctx, convs)
    decision = train_run.decide(resume=cfg.resume)
    yield train_run.explain(decision)
    if decision.action == "reuse" and decision.entry:
        reused = str(decision.entry["sampler_path"])
        try:
            outputs: list[str] = []
            async for ev in _sample_after(ctx, reused, cfg.use_system_prompt, outputs):
                yield ev
        except FileNotFoundError as e:
            yield LogLine(f"cannot reuse the finished training ({e}); training again", "warning")
            decision = Decision("fresh", "the finished checkpoint is gone")
        else:
            yield StageFinished(
                stage=ctx.stage,
                outputs=(*outputs, ws.rel(registry_path(ws.results_dir))),
                summary=f"reused the finished training ({decision.entry.get('step')} steps); "
                f"checkpoint {reused}",
            )
            return
    async for ev in _train(ctx, train_run, decision, plan, convs, model):
        yield ev


def training_conversations(
    rows: list[dict[str, Any]], cfg: Any
) -> tuple[list[list[dict[str, str]]], str]:
    """The conversations sft trains on (``sft.train_on``, ending in a non-empty reply), and
    which rows they are, in words. The estimate counts the same ones."""
    selected, how = select_rows(rows, cfg.train_on)
    convs = [
        c
        for c in (conversation(r, cfg.use_system_prompt) for r in selected)
        if c and c[-1]["role"] == "assistant" and c[-1]["content"].strip()
    ]
    return convs, how


def train_run_for(ctx: StageContext, convs: list[list[dict[str, str]]]) -> TrainRun:
    """sft's lifecycle: its whole section, the conversations, the policy and the split."""
    cfg = ctx.config.sft
    model = ctx.model("policy")
    holdout = split_fingerprint(ctx.split())  # the synthetic data came from the training demos
    return TrainRun(
        ctx,
        "sft",
        section="sft",
        settings=section_settings(cfg, "sft"),
        inputs={"data": digest(convs), "base_model": model, "split": holdout},
        total=plan_training(convs, cfg).total_steps,
        length_keys=("sft.steps", "sft.epochs"),
        growable=cfg.lr_schedule != "linear",  # a linear schedule's every step depends on the total
        fields={
            "base_model": model,
            "use_system_prompt": cfg.use_system_prompt,  # the context evaluate gives it
            "holdout": holdout,  # evaluate checks the held-out set is still this one
        },
    )


@dataclass(frozen=True)
class SftPlan:
    """What sft will do with its rows: the validation split, the batch size and the steps."""

    train_convs: list[list[dict[str, str]]]
    val_convs: list[list[dict[str, str]]]
    batch_size: int
    total_steps: int


def plan_training(convs: list[list[dict[str, str]]], cfg: Any) -> SftPlan:
    order = list(range(len(convs)))
    random.Random(cfg.seed).shuffle(order)
    vf = cfg.val_fraction
    n_val = min(len(convs) - 1, max(1, round(len(convs) * vf))) if vf > 0 and len(convs) >= 2 else 0
    val_convs = [convs[i] for i in order[:n_val]]
    train_convs = [convs[i] for i in order[n_val:]]
    batch_size = min(cfg.batch_size, len(train_convs))
    total_steps = (
        cfg.steps
        if cfg.steps > 0
        else max(1, cfg.epochs * math.ceil(len(train_convs) / batch_size))
    )
    return SftPlan(train_convs, val_convs, batch_size, total_steps)


async def _train(
    ctx: StageContext,
    train_run: TrainRun,
    decision: Decision,
    plan: SftPlan,
    convs: list[list[dict[str, str]]],
    model: str,
) -> AsyncIterator[Event]:
    from tinker_cookbook.supervised.common import datum_from_model_input_weights

    from engine.backends.renderers import get_renderer_for

    ws = ctx.workspace
    cfg = ctx.config.sft
    svc = ctx.service_client()
    max_length = cfg.max_length

    async def new_client() -> Any:
        return await resolve(
            svc.create_lora_training_client(base_model=model, rank=cfg.rank, seed=cfg.seed)
        )

    for ev in await train_run.start(decision, new_client):
        yield ev
    tc = train_run.tc
    if train_run.step == 0:
        yield LogLine(
            f"LoRA rank {cfg.rank} on {model} ({ctx.backend}); {len(plan.train_convs)} train / "
            f"{len(plan.val_convs)} val rows; {plan.total_steps} steps of {plan.batch_size}"
        )
    renderer = get_renderer_for(model, tc.get_tokenizer())

    def to_datum(msgs: list[dict[str, str]]) -> tuple[tinker.Datum, int]:
        mi, weights = renderer.build_supervised_example(msgs)
        return datum_from_model_input_weights(mi, weights, max_length=max_length), mi.length

    # Tokenizing thousands of rows takes seconds: keep it off the event loop (the TUI's).
    train_sized = await asyncio.to_thread(lambda: [to_datum(c) for c in plan.train_convs])
    val_sized = await asyncio.to_thread(lambda: [to_datum(c) for c in plan.val_convs])
    long_note, hint = _too_long(train_sized + val_sized, cfg)
    if long_note:
        yield LogLine(f"{long_note}: {hint}", "warning")
    batch_size = plan.batch_size
    if cfg.too_long == "drop":
        train_sized = [(d, n) for d, n in train_sized if n <= max_length]
        val_sized = [(d, n) for d, n in val_sized if n <= max_length]
        if not train_sized:
            raise StageError(
                f"every training row is longer than sft.max_length={max_length} tokens; "
                'raise sft.max_length or set sft.too_long = "cut"'
            )
        batch_size = min(batch_size, len(train_sized))
    train_data = [d for d, _ in train_sized]
    val_data = [d for d, _ in val_sized]
    can_eval = bool(val_data) and hasattr(tc, "forward")
    if val_data and not can_eval:
        yield LogLine("this backend has no forward(); skipping validation loss", "warning")

    async def val_loss() -> float:
        return mean_nll(await resolve(tc.forward(val_data, "cross_entropy")), val_data)

    async def one_step(step: int) -> AsyncIterator[Event]:
        batch = [train_data[i] for i in batch_indices(step, len(train_data), batch_size, cfg.seed)]
        lr = cfg.lr * (1 - step / plan.total_steps) if cfg.lr_schedule == "linear" else cfg.lr
        yield Metric("train/loss", step + 1, await supervised_step(tc, batch, adam(ctx, lr)))
        if can_eval and ((step + 1) % cfg.eval_every == 0 or step + 1 == plan.total_steps):
            yield Metric("val/loss", step + 1, await val_loss())

    if can_eval:
        yield Metric("val/loss", train_run.step, await val_loss())
    final: CheckpointSaved | None = None
    async for ev in train_run.steps(
        one_step, label="sft: steps", checkpoint_every=cfg.checkpoint_every
    ):
        if isinstance(ev, CheckpointSaved):
            final = ev
        yield ev
    assert final is not None
    outputs: list[str] = []
    async for ev in _sample_after(ctx, final.sampler_path, cfg.use_system_prompt, outputs):
        yield ev
    yield StageFinished(
        stage=ctx.stage,
        outputs=(*outputs, ws.rel(registry_path(ws.results_dir))),
        summary=f"{train_run.step} steps on {len(train_data)} rows; checkpoint {final.sampler_path}"
        + (f"; {long_note}" if long_note else ""),
    )


def _too_long(sized: list[tuple[tinker.Datum, int]], cfg: Any) -> tuple[str, str]:
    """What happened to rows longer than sft.max_length (cut or dropped), and the hint;
    ("", "") when none is."""
    too_long = sorted(n for _, n in sized if n > cfg.max_length)
    if not too_long:
        return "", ""
    verb = "left out" if cfg.too_long == "drop" else "cut"
    note = (
        f"{len(too_long)} of {len(sized)} rows longer than "
        f"sft.max_length={cfg.max_length} tokens {verb} (longest {too_long[-1]} tokens, "
        f"{sum(n - cfg.max_length for n in too_long)} tokens lost)"
    )
    hint = (
        'raise sft.max_length, or set sft.too_long = "drop" to leave them out'
        if cfg.too_long == "cut"
        else "raise sft.max_length to keep them"
    )
    return note, hint


async def _sample_after(
    ctx: StageContext, sampler_path: str, use_system: bool, outputs: list[str]
) -> AsyncIterator[Event]:
    """Sample the trained policy on every demo input (``sft.sample_after``) -> results/."""
    if not ctx.config.sft.sample_after:
        return
    ws = ctx.workspace
    demos = ws.load_demos()
    sampler = await open_sampler(ctx, role="policy", model_path=sampler_path)
    system_prompt = str(ws.load_prompts().get("system_prompt", "")).strip() if use_system else None
    out = ws.result(OUTPUT)
    async for ev in sample_demo_inputs(
        ctx, sampler, demos, out, system_prompt=system_prompt, source="sft"
    ):
        yield ev
    outputs.append(ws.rel(out))
