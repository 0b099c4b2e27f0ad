"""Stage 10: DITTO, online DPO against the person's own demonstrations.

Shaikh et al., "Aligning Language Models with Demonstrated Feedback" (ICLR 2025), Algorithm 1:

1. SFT initialisation: LoRA SFT on the *training* demonstrations (``ctx.split().train``; the
   held-out ones never), stopping once a batch loss falls below ``ditto.sft_stop_loss`` or
   after ``ditto.sft_max_steps``. Saved as checkpoint "sft-init"; its sampler weights are the
   frozen DPO reference (``reference_path`` in results/checkpoints.toml [ditto]).
2. Rounds: the current policy samples ``samples_per_demo`` completions per training request
   at ``temperature``; they join a replay buffer tagged with the round and the checkpoint
   that wrote them (``runs/<run>/ditto_buffer.json``).
3. Each DPO step draws ``batch_prompts`` requests and ``pairs_per_prompt`` pairs per request
   with ``engine.ditto_pairs.draw_pairs`` (online / replay / intermodel in ``mix``).
4. DPO loss (tinker-cookbook's ``compute_dpo_loss``, beta ``ditto.beta``) through
   ``forward_backward_custom``; reference log-probabilities come from ``compute_logprobs`` on
   the reference sampler, as the cookbook's ``train_dpo`` does (cached per sequence, since
   the reference does not move; with ``update_reference`` it moves to the policy that sampled
   each round, the paper's ablation).
5. After every round: state + sampler checkpoint "round-<k>" recorded under [ditto] with the
   round, the step and the buffer's path. A rerun (after a kill or a cancel) resumes after
   the last finished round with the buffer as it was; a finished training is reused, and
   only the final sampling runs again.
6. ``results/ditto_model_outputs.json``: the trained policy on every demonstration request
   (held-out ones included: evaluate samples those itself, but the Compare tab shows them).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import tinker

from engine.checkpoints import latest_checkpoint, record_checkpoint, registry_path
from engine.context import StageCancelled, StageContext, StageError
from engine.ditto_pairs import KINDS, Pair, ReplayBuffer, Sample, batch_requests, draw_pairs
from engine.events import (
    CheckpointSaved,
    Event,
    LogLine,
    Metric,
    Progress,
    SampleProduced,
    StageFinished,
)
from engine.sampling import Sampler, as_completed_tasks, resolve
from engine.split import split_fingerprint
from engine.stages._policy_samples import sample_demo_inputs
from engine.stages.sft import mean_nll
from engine.workspace import RESULT_FILES

OUTPUT = RESULT_FILES["ditto"]
BUFFER_FILE = "ditto_buffer.json"
SFT_INIT = "sft-init"
# Fields that do not change what is trained (a rerun with other values still resumes).
_NOT_FINGERPRINTED = ("rounds", "resume", "sample_after")


def fingerprint_of(cfg: Any, train: Sequence[dict[str, str]], model: str, backend: str) -> str:
    fields = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in vars(cfg).items()
        if k not in _NOT_FINGERPRINTED
    }
    blob = json.dumps([list(train), model, backend, fields], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def conversation(request: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]


def dpo_loss(
    policy_logprobs: Sequence[Any],
    weights: Sequence[Any],
    ref_logprobs: Sequence[Any],
    beta: float,
) -> tuple[Any, dict[str, float]]:
    """DPO loss of interleaved sequences (chosen, rejected, chosen, ...): per-token policy and
    reference log-probabilities are summed under each sequence's weights, then handed to
    tinker-cookbook's ``compute_dpo_loss`` (mean over pairs of -log sigmoid(beta * margin))."""
    import torch
    from tinker_cookbook.preference.train_dpo import compute_dpo_loss

    sums = [
        torch.dot(lp.float(), w.to(lp.device).float())
        for lp, w in zip(policy_logprobs, weights, strict=True)
    ]
    refs = [
        torch.dot(r.float().cpu(), w.float().cpu()).detach().to(s.device)
        for r, w, s in zip(ref_logprobs, weights, sums, strict=True)
    ]
    return compute_dpo_loss(
        chosen_logprobs=sums[0::2],
        rejected_logprobs=sums[1::2],
        chosen_ref_logprobs=refs[0::2],
        rejected_ref_logprobs=refs[1::2],
        dpo_beta=beta,
    )


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class _Reference:
    """The frozen reference: a sampling client and a cache of per-token log-probabilities."""

    def __init__(self, client: Any, path: str):
        self.client, self.path = client, path
        self._cache: dict[tuple[int, ...], Any] = {}

    async def logprobs(self, data: list[tinker.Datum]) -> list[Any]:
        import torch

        fulls = []
        for d in data:
            targets = d.loss_fn_inputs["target_tokens"].to_torch().tolist()
            fulls.append(tuple(d.model_input.to_ints()) + (int(targets[-1]),))
        missing = [f for f in dict.fromkeys(fulls) if f not in self._cache]
        got = await asyncio.gather(
            *(
                resolve(self.client.compute_logprobs(tinker.ModelInput.from_ints(list(f))))
                for f in missing
            )
        )
        for f, lps in zip(missing, got, strict=True):
            self._cache[f] = torch.tensor([float(x) for x in list(lps)[1:]])
        return [self._cache[f] for f in fulls]


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    from tinker_cookbook.supervised.common import datum_from_model_input_weights

    from engine.backends.renderers import get_renderer_for

    ws = ctx.workspace
    cfg = ctx.config.ditto
    split = ctx.split()
    if split.warning:
        yield LogLine(split.warning, "warning")
    train = list(split.train[: cfg.num_demos] if cfg.num_demos else split.train)
    if not train:
        raise StageError("No training demonstrations: add some in the Demonstrations tab.")
    model = ctx.model("policy")
    seed = cfg.seed
    fingerprint = fingerprint_of(cfg, train, model, ctx.backend)
    n_train = len(train)
    total_steps = cfg.rounds * cfg.steps_per_round
    out_path = ws.result(OUTPUT)
    buffer_path = ctx.run_dir / BUFFER_FILE
    svc = ctx.service_client()

    # ---- resume, reuse or start ------------------------------------------------------
    prev = latest_checkpoint(ws.results_dir, "ditto")
    usable = bool(
        cfg.resume
        and prev
        and prev.get("fingerprint") == fingerprint
        and prev.get("state_path")
        and prev.get("reference_path")
        and int(prev.get("round", 0)) <= cfg.rounds
    )
    if prev and not usable and prev.get("fingerprint") not in (None, fingerprint):
        yield LogLine(
            "the previous DITTO run trained other demonstrations or settings: starting over",
            "warning",
        )
    tc = None
    buffer = ReplayBuffer(meta={"fingerprint": fingerprint})
    rounds_done, reference_path, last_name, last_sampler = 0, "", "", ""
    if usable:
        assert prev is not None
        try:
            if prev.get("finished") and int(prev.get("round", 0)) == cfg.rounds:
                # Training is done: only the final sampling is left (e.g. killed while sampling).
                yield LogLine(f"training already finished ({prev['sampler_path']}); sampling only")
                async for ev in _final_sampling(ctx, str(prev["sampler_path"]), out_path):
                    yield ev
                yield _finished(
                    ctx, out_path, f"reused the finished training ({prev['sampler_path']})"
                )
                return
            buffer = ReplayBuffer.load(prev["buffer_path"])
            tc = await resolve(
                svc.create_training_client_from_state_with_optimizer(prev["state_path"])
            )
            rounds_done = int(prev.get("round", 0))
            reference_path = str(prev["reference_path"])
            last_name, last_sampler = str(prev["checkpoint"]), str(prev["sampler_path"])
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            yield LogLine(f"cannot resume the previous DITTO run ({e}); starting over", "warning")
            tc, buffer = None, ReplayBuffer(meta={"fingerprint": fingerprint})
        if tc is not None:
            # Samples of the round in flight at the kill stay only when they came from the
            # checkpoint we resume from (they are then exactly what this round would sample).
            dropped = buffer.keep(
                lambda s: (
                    s.round <= rounds_done
                    or (s.round == rounds_done + 1 and s.checkpoint == last_name)
                )
            )
            yield LogLine(
                f"resuming after round {rounds_done}/{cfg.rounds} from {last_name} "
                f"({len(buffer.samples)} buffered samples"
                + (f", {dropped} dropped" if dropped else "")
                + ")"
            )
    if tc is None:
        tc = await resolve(
            svc.create_lora_training_client(base_model=model, rank=cfg.rank, seed=seed)
        )
    tokenizer = tc.get_tokenizer()
    renderer = get_renderer_for(model, tokenizer)

    def to_datum(request: str, answer: str) -> tinker.Datum:
        mi, weights = renderer.build_supervised_example(conversation(request, answer))
        return datum_from_model_input_weights(mi, weights, max_length=cfg.max_length)

    step = rounds_done * cfg.steps_per_round

    async def save(name: str, finished: bool) -> CheckpointSaved:
        state_future = tc.save_state(name)  # both submitted before either is awaited
        sampler_future = tc.save_weights_for_sampler(name)
        state, sampler = await resolve(state_future), await resolve(sampler_future)
        buffer.meta.update(fingerprint=fingerprint, rounds_done=rounds_done)
        buffer.save(buffer_path)
        record_checkpoint(
            ws.results_dir,
            "ditto",
            sampler_path=str(sampler.path),
            state_path=str(state.path),
            checkpoint=name,
            round=rounds_done,
            total_rounds=cfg.rounds,
            step=step,
            total_steps=total_steps,
            finished=finished,
            reference_path=reference_path or str(sampler.path),
            buffer_path=str(buffer_path),
            run=ws.rel(ctx.run_dir),
            fingerprint=fingerprint,
            base_model=model,
            backend=ctx.backend,
            holdout=split_fingerprint(split),  # evaluate checks the held-out set is unchanged
        )
        return CheckpointSaved(
            name=name, step=step, sampler_path=str(sampler.path), state_path=str(state.path)
        )

    # ---- 1. SFT initialisation ---------------------------------------------------------
    if not reference_path:
        async for ev in _sft_init(ctx, tc, train, to_datum):
            yield ev
        ckpt = await save(SFT_INIT, finished=False)
        reference_path = last_sampler = ckpt.sampler_path
        last_name = SFT_INIT
        record_checkpoint(ws.results_dir, "ditto", reference_path=reference_path)
        yield ckpt

    reference = _Reference(
        await resolve(svc.create_sampling_client(model_path=reference_path, base_model=model)),
        reference_path,
    )
    probe = [to_datum(train[0]["input"], train[0]["output"])]

    # ---- 2-5. rounds -------------------------------------------------------------------
    yield Progress(step, total_steps, f"ditto: round {rounds_done + 1}/{cfg.rounds}")
    try:
        for rnd in range(rounds_done + 1, cfg.rounds + 1):
            ctx.check_cancel()
            if cfg.update_reference and reference.path != last_sampler:
                reference = _Reference(
                    await resolve(
                        svc.create_sampling_client(model_path=last_sampler, base_model=model)
                    ),
                    last_sampler,
                )
                reference_path = last_sampler
                record_checkpoint(ws.results_dir, "ditto", reference_path=reference_path)
                yield LogLine(f"round {rnd}: reference moved to {last_name} (update_reference)")
            # What the reference says of one demonstration: constant unless update_reference.
            ref_lp = await reference.logprobs(probe)
            yield Metric("ditto/reference_logprob", rnd, float((ref_lp[0] * _w(probe[0])).sum()))

            async for ev in _sample_round(
                ctx,
                svc,
                renderer,
                tokenizer,
                model,
                train,
                buffer,
                rnd,
                last_name,
                last_sampler,
                buffer_path,
            ):
                yield ev

            for s in range(1, cfg.steps_per_round + 1):
                ctx.check_cancel()
                idx = batch_requests(step, n_train, cfg.batch_prompts, seed + 1)
                rng = random.Random(f"ditto-pairs-{seed}-{step}")
                pairs, counts = draw_pairs(
                    [train[i] for i in idx],
                    buffer,
                    rnd,
                    len(idx) * cfg.pairs_per_prompt,
                    cfg.mix,
                    rng,
                    replay=cfg.replay,
                    intermodel=cfg.intermodel,
                )
                metrics = await _dpo_step(tc, reference, pairs, to_datum, cfg)
                step += 1
                yield Metric("ditto/dpo_loss", step, metrics["dpo_loss"])
                yield Metric("ditto/chosen_reward", step, metrics["chosen_reward"])
                yield Metric("ditto/rejected_reward", step, metrics["rejected_reward"])
                yield Metric("ditto/margin", step, metrics["margin"])
                yield Metric("ditto/pair_accuracy", step, metrics["accuracy"])
                for kind in KINDS:
                    yield Metric(f"ditto/pairs_{kind}", step, float(counts[kind]))
                yield Progress(
                    step,
                    total_steps,
                    f"ditto: round {rnd}/{cfg.rounds} step {s}/{cfg.steps_per_round}",
                )
            rounds_done = rnd
            last_name = f"round-{rnd}"
            ckpt = await save(last_name, finished=rnd == cfg.rounds)
            last_sampler = ckpt.sampler_path
            yield ckpt
    except StageCancelled:
        yield LogLine(
            f"cancelled in round {rounds_done + 1}; rerun to resume after round {rounds_done} "
            "(its checkpoint and the replay buffer are kept)"
        )
        raise

    async for ev in _final_sampling(ctx, last_sampler, out_path):
        yield ev
    yield _finished(
        ctx,
        out_path,
        f"SFT init + {cfg.rounds} DPO rounds ({step} steps); checkpoint {last_sampler}",
    )


def _w(d: tinker.Datum) -> Any:
    return d.loss_fn_inputs["weights"].to_torch().float()


def _finished(ctx: StageContext, out_path: Path, summary: str) -> StageFinished:
    ws = ctx.workspace
    outputs = [ws.rel(registry_path(ws.results_dir))]
    if ctx.config.ditto.sample_after:
        outputs.insert(0, ws.rel(out_path))
    return StageFinished(stage=ctx.stage, outputs=tuple(outputs), summary=summary)


async def _sft_init(
    ctx: StageContext, tc: Any, train: list[dict[str, str]], to_datum: Any
) -> AsyncIterator[Event]:
    cfg = ctx.config.ditto
    data = [to_datum(d["input"], d["output"]) for d in train]
    b = min(cfg.batch_prompts, len(data))
    yield LogLine(
        f"SFT init on {len(data)} training demonstrations: up to {cfg.sft_max_steps} steps of {b}, "
        f"lr {cfg.sft_lr}, LoRA rank {cfg.rank}; stops once the batch loss < {cfg.sft_stop_loss}"
    )
    loss = float("nan")
    for step in range(cfg.sft_max_steps):
        ctx.check_cancel()
        batch = [data[i] for i in batch_requests(step, len(data), b, cfg.seed)]
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(
            tinker.AdamParams(learning_rate=cfg.sft_lr, beta1=0.9, beta2=0.95, eps=1e-8)
        )
        loss = mean_nll(await resolve(fb), batch)
        await resolve(opt)
        yield Metric("ditto/sft_loss", step + 1, loss)
        yield Metric("ditto/sft_stop_loss", step + 1, cfg.sft_stop_loss)
        yield Progress(step + 1, cfg.sft_max_steps, "ditto: SFT init")
        if loss < cfg.sft_stop_loss:
            yield LogLine(
                f"SFT init: batch loss {loss:.3f} < {cfg.sft_stop_loss} after {step + 1} steps: stopping"
            )
            return
    yield LogLine(
        f"SFT init: {cfg.sft_max_steps} steps, last batch loss {loss:.3f} "
        f"(stop line {cfg.sft_stop_loss} not reached)"
    )


async def _sample_round(
    ctx: StageContext,
    svc: Any,
    renderer: Any,
    tokenizer: Any,
    model: str,
    train: list[dict[str, str]],
    buffer: ReplayBuffer,
    rnd: int,
    ckpt_name: str,
    ckpt_path: str,
    buffer_path: Path,
) -> AsyncIterator[Event]:
    cfg = ctx.config.ditto
    have = {d["input"]: len(buffer.of(d["input"], round=rnd)) for d in train}
    if all(n >= cfg.samples_per_demo for n in have.values()):
        yield LogLine(
            f"round {rnd}: reusing {sum(have.values())} samples of {ckpt_name} from the buffer"
        )
        return
    buffer.keep(lambda s: s.round != rnd)
    client = await resolve(svc.create_sampling_client(model_path=ckpt_path, base_model=model))
    sampler = Sampler(client=client, renderer=renderer, tokenizer=tokenizer, model=model)
    sem = asyncio.Semaphore(max(1, ctx.config.sampling.concurrency))

    async def one(i: int, d: dict[str, str]) -> tuple[int, list[str]]:
        async with sem:
            ctx.check_cancel()
            texts = await sampler.generate(
                [{"role": "user", "content": d["input"]}],
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=1.0,
                seed=cfg.seed * 1_000_003 + rnd * 10_007 + i * cfg.samples_per_demo,
                num_samples=cfg.samples_per_demo,
                trim_repeats=False,  # what the policy wrote is what DPO pushes down
            )
            return i, texts

    label = f"ditto: round {rnd}/{cfg.rounds} sampling"
    yield Progress(0, len(train), label)
    got: dict[int, list[str]] = {}
    async with aclosing(as_completed_tasks(one(i, d) for i, d in enumerate(train))) as done:
        async for i, texts in done:
            got[i] = texts
            yield Progress(len(got), len(train), label)
            ctx.check_cancel()
    for i, d in enumerate(train):
        buffer.add(Sample(d["input"], rnd, ckpt_name, t) for t in got[i])
    buffer.meta["sampled_round"] = rnd
    await asyncio.to_thread(buffer.save, buffer_path)
    show = train[(rnd - 1) % len(train)]
    sample = got[(rnd - 1) % len(train)][0] if got[(rnd - 1) % len(train)] else ""
    yield LogLine(
        f"round {rnd}: {len(train) * cfg.samples_per_demo} samples from {ckpt_name}. "
        f"Request: {_short(show['input'], 120)}\n  demonstration: {_short(show['output'])}\n"
        f"  sample:        {_short(sample)}"
    )
    yield SampleProduced(input=show["input"], output=sample, source=f"ditto round {rnd}")


async def _dpo_step(
    tc: Any, reference: _Reference, pairs: list[Pair], to_datum: Any, cfg: Any
) -> dict[str, float]:
    data: list[tinker.Datum] = []
    for p in pairs:
        data += [to_datum(p.request, p.chosen), to_datum(p.request, p.rejected)]
    refs = await reference.logprobs(data)
    weights = [_w(d) for d in data]

    def loss_fn(_data: list[tinker.Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        return dpo_loss(logprobs, weights, refs, cfg.beta)

    fb = tc.forward_backward_custom(data, loss_fn)
    opt = tc.optim_step(tinker.AdamParams(learning_rate=cfg.lr, beta1=0.9, beta2=0.95, eps=1e-8))
    result = await resolve(fb)
    await resolve(opt)
    return {k: float(v) for k, v in dict(result.metrics).items()}


async def _final_sampling(
    ctx: StageContext, sampler_path: str, out_path: Path
) -> AsyncIterator[Event]:
    if not ctx.config.ditto.sample_after:
        return
    from engine.sampling import open_sampler

    sampler = await open_sampler(ctx, model_path=sampler_path)
    async for ev in sample_demo_inputs(
        ctx, sampler, ctx.workspace.load_demos(), out_path, system_prompt=None, source="ditto"
    ):
        yield ev
