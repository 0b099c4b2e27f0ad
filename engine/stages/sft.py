"""Stage 6: LoRA SFT of the policy on the reviewed synthetic pairs, then sample it on the demos.

Which rows train (``sft.train_on``):
  "auto" (default)  accepted + edited rows; when none are reviewed yet, every row that is
                    not rejected (pending included), and the log says so.
  "reviewed"        accepted + edited only (fails when there are none).
  "non-rejected"    every row except rejected ones.

Loss: the renderer's supervised example (weights on the assistant reply only), cross-entropy.
The service returns summed losses, so ``train/loss`` and ``val/loss`` are the per-token mean
NLL: -sum(logprob * weight) / sum(weight).

Checkpoints every ``checkpoint_every`` steps, on cancel, and at the end (save_state +
save_weights_for_sampler), recorded in results/checkpoints.toml under [sft]. A rerun after a
kill or cancel resumes from the recorded state (weights, optimizer and step) when the data,
model and rank are unchanged; ``--set sft.resume=false`` starts over. A rerun after a finished
training with the same data and settings (say, killed while sampling its outputs) reuses the
final checkpoint and only samples.

Rows longer than ``sft.max_length`` tokens are cut (``sft.too_long = "cut"``, the default) or
left out (``"drop"``); how many and by how much is logged and put in the run's summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import tinker

from engine import results
from engine.context import StageCancelled, StageContext, StageError
from engine.events import CheckpointSaved, Event, LogLine, Metric, Progress, StageFinished
from engine.results import RESULT_FILES, latest_checkpoint, registry_path
from engine.sampling import open_sampler, resolve
from engine.split import split_fingerprint
from engine.stages._policy_samples import sample_demo_inputs
from engine.stages.synth_outputs import warn_bad
from engine.training import cancel_checkpoint, save_checkpoint, step_name

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


def mean_nll(result: Any, batch: list[tinker.Datum]) -> float:
    """Per-token mean NLL of a forward(_backward) result (losses come back as sums)."""
    total_w = sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in batch)
    outs = getattr(result, "loss_fn_outputs", None)
    if outs:
        s = 0.0
        for out, d in zip(outs, batch, strict=True):
            lp = out["logprobs"].to_torch().float()
            w = d.loss_fn_inputs["weights"].to_torch().float()
            s += float((lp * w).sum())
        return -s / total_w if total_w else float("nan")
    loss_sum = float(getattr(result, "metrics", {}).get("loss:sum", float("nan")))
    return loss_sum / total_w if total_w else float("nan")


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Rows of batch ``step``: epochs of seeded shuffles laid end to end (same on resume)."""
    start = step * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, k = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(order[k])
    return out


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    from tinker_cookbook.supervised.common import datum_from_model_input_weights

    from engine.backends.renderers import get_renderer_for

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
    selected, how = select_rows(loaded.rows, cfg.train_on)
    use_system = cfg.use_system_prompt
    convs = [
        c
        for c in (conversation(r, use_system) for r in selected)
        if c and c[-1]["role"] == "assistant" and c[-1]["content"].strip()
    ]
    if not convs:
        raise StageError(
            f"No training rows in {ws.rel(data_path)} ({how}). Accept some rows in the Synthetic data tab "
            "or rerun synth-outputs."
        )
    yield LogLine(f"training on {how}", "warning" if how.startswith("no rows") else "info")

    model = ctx.model("policy")
    rank = cfg.rank
    seed = cfg.seed
    max_length = cfg.max_length
    # What a resumed run must share with the one it continues (data, model, split, batches).
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                convs,
                model,
                rank,
                max_length,
                ctx.backend,
                seed,
                cfg.val_fraction,
                cfg.batch_size,
                *(["drop"] if cfg.too_long == "drop" else []),
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]

    # split
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    vf = cfg.val_fraction
    n_val = min(len(convs) - 1, max(1, round(len(convs) * vf))) if vf > 0 and len(convs) >= 2 else 0
    val_convs = [convs[i] for i in order[:n_val]]
    train_convs = [convs[i] for i in order[n_val:]]
    batch_size = min(cfg.batch_size, len(train_convs))
    steps_cfg = cfg.steps
    total_steps = (
        steps_cfg
        if steps_cfg > 0
        else max(1, cfg.epochs * math.ceil(len(train_convs) / batch_size))
    )
    lr = cfg.lr
    schedule = cfg.lr_schedule
    ckpt_every = cfg.checkpoint_every
    eval_every = cfg.eval_every

    results.check_writable(ws.results_dir)  # a read-only or full results/ fails now, not at the end
    # What a finished training must share with this run to be reused as it is.
    final_fp = hashlib.sha256(
        json.dumps([fingerprint, total_steps, lr, schedule], sort_keys=True).encode()
    ).hexdigest()[:16]
    svc = ctx.service_client()
    prev = latest_checkpoint(ws.results_dir, "sft")
    if (
        cfg.resume
        and prev
        and prev.get("finished", False)
        and prev.get("final_fingerprint") == final_fp
        and prev.get("sampler_path")
    ):
        reused = str(prev["sampler_path"])
        yield LogLine(
            f"training already finished ({reused}, step {prev.get('step')}): reusing it"
            + (", sampling only" if cfg.sample_after else "")
            + "; --set sft.resume=false trains again"
        )
        try:
            outputs = []
            async for ev in _sample_after(ctx, reused, use_system, outputs):
                yield ev
        except FileNotFoundError as e:
            yield LogLine(f"cannot reuse the finished training ({e}); training again", "warning")
        else:
            yield StageFinished(
                stage=ctx.stage,
                outputs=(*outputs, ws.rel(registry_path(ws.results_dir))),
                summary=f"reused the finished training ({prev.get('step')} steps); "
                f"checkpoint {reused}",
            )
            return
    start_step, resumed = 0, False
    if (
        cfg.resume
        and prev
        and not prev.get("finished", False)
        and prev.get("state_path")
        and prev.get("fingerprint") == fingerprint
        and int(prev.get("step", 0)) < total_steps
    ):
        try:
            tc = await resolve(
                svc.create_training_client_from_state_with_optimizer(prev["state_path"])
            )
            start_step, resumed = int(prev["step"]), True
            yield LogLine(f"resuming from step {start_step} ({prev['state_path']})")
        except FileNotFoundError as e:
            yield LogLine(f"cannot resume ({e}); starting over", "warning")
            prev = None
    if not resumed:
        if (
            prev
            and not prev.get("finished", False)
            and prev.get("fingerprint") not in (None, fingerprint)
        ):
            yield LogLine(
                "previous unfinished SFT run trained other data or another model: starting over",
                "warning",
            )
        yield LogLine(
            f"LoRA rank {rank} on {model} ({ctx.backend}); {len(train_convs)} train / {len(val_convs)} val rows; "
            f"{total_steps} steps of {batch_size}"
        )
        tc = await resolve(svc.create_lora_training_client(base_model=model, rank=rank, seed=seed))
    tokenizer = tc.get_tokenizer()
    renderer = get_renderer_for(model, tokenizer)

    def to_datum(msgs: list[dict[str, str]]) -> tuple[tinker.Datum, int]:
        mi, weights = renderer.build_supervised_example(msgs)
        return datum_from_model_input_weights(mi, weights, max_length=max_length), mi.length

    # Tokenizing thousands of rows takes seconds: keep it off the event loop (the TUI's).
    train_sized = await asyncio.to_thread(lambda: [to_datum(c) for c in train_convs])
    val_sized = await asyncio.to_thread(lambda: [to_datum(c) for c in val_convs])
    too_long = sorted(n for _, n in train_sized + val_sized if n > max_length)
    long_note = ""
    if too_long:
        verb = "left out" if cfg.too_long == "drop" else "cut"
        long_note = (
            f"{len(too_long)} of {len(train_sized) + len(val_sized)} rows longer than "
            f"sft.max_length={max_length} tokens {verb} (longest {too_long[-1]} tokens, "
            f"{sum(n - max_length for n in too_long)} tokens lost)"
        )
        hint = (
            'raise sft.max_length, or set sft.too_long = "drop" to leave them out'
            if cfg.too_long == "cut"
            else "raise sft.max_length to keep them"
        )
        yield LogLine(f"{long_note}: {hint}", "warning")
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

    last_saved = start_step
    holdout = split_fingerprint(ctx.split())  # the synthetic data came from the training demos

    async def save(step: int, name: str, finished: bool) -> CheckpointSaved:
        return await save_checkpoint(
            ctx,
            tc,
            "sft",
            name,
            step=step,
            total_steps=total_steps,
            finished=finished,
            fingerprint=fingerprint,
            final_fingerprint=final_fp if finished else None,
            base_model=model,
            use_system_prompt=use_system,  # the context evaluate gives this checkpoint
            holdout=holdout,  # evaluate checks the held-out set is still this one
        )

    async def val_loss() -> float:
        return mean_nll(await resolve(tc.forward(val_data, "cross_entropy")), val_data)

    if can_eval:
        yield Metric("val/loss", start_step, await val_loss())
    yield Progress(start_step, total_steps, "sft: steps")
    step = start_step
    try:
        while step < total_steps:
            ctx.check_cancel()
            batch = [train_data[i] for i in batch_indices(step, len(train_data), batch_size, seed)]
            step_lr = lr * (1 - step / total_steps) if schedule == "linear" else lr
            fb = tc.forward_backward(batch, "cross_entropy")  # submit both before awaiting
            opt = tc.optim_step(
                tinker.AdamParams(learning_rate=step_lr, beta1=0.9, beta2=0.95, eps=1e-8)
            )
            fb_result = await resolve(fb)
            await resolve(opt)
            step += 1
            yield Metric("train/loss", step, mean_nll(fb_result, batch))
            if can_eval and (step % eval_every == 0 or step == total_steps):
                yield Metric("val/loss", step, await val_loss())
            yield Progress(step, total_steps, "sft: steps")
            if ckpt_every and step % ckpt_every == 0 and step < total_steps:
                yield await save(step, step_name(step), finished=False)
                last_saved = step
    except StageCancelled:
        async for ev in cancel_checkpoint(save, step, last_saved, total_steps):
            yield ev
        raise
    final = await save(step, "final", finished=True)
    yield final

    outputs: list[str] = []
    async for ev in _sample_after(ctx, final.sampler_path, use_system, outputs):
        yield ev
    yield StageFinished(
        stage=ctx.stage,
        outputs=(*outputs, ws.rel(registry_path(ws.results_dir))),
        summary=f"{step} steps on {len(train_data)} rows; checkpoint {final.sampler_path}"
        + (f"; {long_note}" if long_note else ""),
    )


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
