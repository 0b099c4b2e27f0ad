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
   with ``engine.stages.ditto_pairs.draw_pairs`` (online / replay / intermodel in ``mix``).
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
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import tinker

from engine.llm.sampling import Sampler, as_completed_tasks, resolve
from engine.run.context import StageContext, StageError
from engine.run.events import (
    CheckpointSaved,
    Event,
    LogLine,
    Metric,
    Progress,
    SampleProduced,
    StageFinished,
)
from engine.run.supervised import supervised_step
from engine.run.train_run import Decision, TrainRun, adam, digest, section_settings
from engine.stages._policy_samples import sample_demo_inputs
from engine.stages.ditto_pairs import KINDS, Pair, ReplayBuffer, Sample, batch_requests, draw_pairs
from engine.store.checkpoints import record_checkpoint, registry_path
from engine.store.split import split_fingerprint
from engine.store.workspace import RESULT_FILES

OUTPUT = RESULT_FILES["ditto"]
BUFFER_FILE = "ditto_buffer.json"
SFT_INIT = "sft-init"
SFT_DEMOS = "sft-demos"  # the SFT initialisation's own registry entry: a method of its own
# The SFT initialisation's settings; every other ditto setting is the DPO rounds'.
_SFT_KEYS = ("rank", "max_length", "seed", "batch_prompts", "num_demos", "checkpoint_every")


def _sft_setting(key: str) -> bool:
    return key.startswith("sft_") or key in _SFT_KEYS


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


def sft_run_for(ctx: StageContext, train: list[dict[str, str]]) -> TrainRun:
    """The SFT initialisation's lifecycle: its settings, the demonstrations, the policy."""
    cfg = ctx.config.ditto
    model = ctx.model("policy")
    holdout = split_fingerprint(ctx.split())
    return TrainRun(
        ctx,
        SFT_DEMOS,
        section="ditto",
        settings=section_settings(cfg, "ditto", only=_sft_setting),
        inputs={"data": digest(train), "base_model": model, "split": holdout},
        total=cfg.sft_max_steps,
        length_keys=("ditto.sft_max_steps",),
        names=lambda n, finished: SFT_INIT if finished else f"{SFT_INIT}-{n:06d}",
        # evaluate measures it as a method: SFT on the demonstrations, no system prompt
        fields={"base_model": model, "use_system_prompt": False, "holdout": holdout},
    )


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    from tinker_cookbook.supervised.common import datum_from_model_input_weights

    from engine.backends.renderers import get_renderer_for

    cfg = ctx.config.ditto
    split = ctx.split()
    if split.warning:
        yield LogLine(split.warning, "warning")
    train = list(split.train[: cfg.num_demos] if cfg.num_demos else split.train)
    if not train:
        raise StageError("No training demonstrations: add some in the Demonstrations tab.")
    model = ctx.model("policy")
    holdout = split_fingerprint(split)
    sft_run = sft_run_for(ctx, train)
    sft_decision = sft_run.decide(resume=cfg.resume)
    yield sft_run.explain(sft_decision)
    svc = ctx.service_client()

    async def lora() -> Any:
        return await resolve(
            svc.create_lora_training_client(base_model=model, rank=cfg.rank, seed=cfg.seed)
        )

    tc = None
    renderer: Any = None

    def to_datum(request: str, answer: str) -> tinker.Datum:
        mi, weights = renderer.build_supervised_example(conversation(request, answer))
        return datum_from_model_input_weights(mi, weights, max_length=cfg.max_length)

    # ---- 1. SFT initialisation (its own lifecycle: a rerun reuses it when only DPO changed)
    if sft_decision.action == "reuse" and sft_decision.entry:
        sft_entry = dict(sft_decision.entry)
    else:
        for ev in await sft_run.start(sft_decision, lora):
            yield ev
        tc = sft_run.tc
        renderer = get_renderer_for(model, tc.get_tokenizer())
        async for ev in _sft_init(ctx, sft_run, train, to_datum):
            yield ev
        assert sft_run.saved is not None
        sft_entry = {
            "sampler_path": sft_run.saved.sampler_path,
            "state_path": sft_run.saved.state_path,
        }

    # ---- 2-5. DPO rounds --------------------------------------------------------------
    rounds = _Rounds(ctx, train, model, holdout, sft_entry)
    decision = rounds.run.decide(resume=cfg.resume)
    yield rounds.run.explain(decision)
    out_path = ctx.workspace.result(OUTPUT)
    if decision.action == "reuse" and decision.entry:
        # Training is done: only the final sampling is left (e.g. killed while sampling).
        path = str(decision.entry["sampler_path"])
        yield LogLine(f"training already finished ({path}); sampling only")
        async for ev in _final_sampling(ctx, path, out_path):
            yield ev
        yield _finished(ctx, out_path, f"reused the finished training ({path})")
        return

    async def from_sft_init() -> Any:
        if tc is not None:  # the SFT initialisation just trained: DPO continues on it
            return tc
        path = str(sft_entry["state_path"])
        return await resolve(svc.create_training_client_from_state_with_optimizer(path))

    async for ev in rounds.open(decision, from_sft_init):
        yield ev
    if renderer is None:
        renderer = get_renderer_for(model, rounds.run.tc.get_tokenizer())
    rounds.renderer, rounds.to_datum = renderer, to_datum
    async for ev in rounds.train():
        yield ev
    async for ev in _final_sampling(ctx, rounds.last_sampler, out_path):
        yield ev
    yield _finished(
        ctx,
        out_path,
        f"SFT init + {cfg.rounds} DPO rounds ({rounds.dpo_step} steps); checkpoint "
        f"{rounds.last_sampler}",
    )


class _Rounds:
    """DITTO's DPO rounds: the replay buffer, the frozen reference, and one TrainRun whose
    counter is the round."""

    def __init__(
        self,
        ctx: StageContext,
        train: list[dict[str, str]],
        model: str,
        holdout: str,
        sft_entry: dict[str, Any],
    ) -> None:
        cfg = ctx.config.ditto
        self.ctx, self.cfg, self.demos, self.model = ctx, cfg, train, model
        self.buffer_path = ctx.run_dir / BUFFER_FILE
        self.reference_path = str(sft_entry["sampler_path"])
        self.last_name, self.last_sampler = SFT_INIT, self.reference_path
        self.dpo_step = 0
        self.renderer: Any = None
        self.to_datum: Any = None
        self.run = TrainRun(
            ctx,
            "ditto",
            section="ditto",
            settings=section_settings(cfg, "ditto", only=lambda k: not _sft_setting(k)),
            inputs={
                "data": digest(train),
                "base_model": model,
                "split": holdout,
                "SFT init": self.reference_path,
            },
            total=cfg.rounds,
            length_keys=("ditto.rounds",),
            unit="round",
            counter="round",
            names=lambda n, finished: f"round-{n}",
            fields={"base_model": model, "holdout": holdout},
            extras=self._extras,
        )
        self.buffer = ReplayBuffer(meta={"fingerprint": self.run.fingerprint})

    async def _extras(self, name: str, rounds_done: int, finished: bool) -> dict[str, Any]:
        """What DITTO keeps beside its weights: the replay buffer and the reference."""
        self.buffer.meta.update(fingerprint=self.run.fingerprint, rounds_done=rounds_done)
        await asyncio.to_thread(self.buffer.save, self.buffer_path)
        return {
            "step": self.dpo_step,
            "total_steps": self.cfg.rounds * self.cfg.steps_per_round,
            "reference_path": self.reference_path,
            "buffer_path": str(self.buffer_path),
        }

    async def open(
        self, decision: Decision, from_sft_init: Callable[[], Awaitable[Any]]
    ) -> AsyncIterator[Event]:
        entry = decision.entry or {}
        if decision.action == "resume":
            path = Path(str(entry.get("buffer_path", "")))
            try:
                self.buffer = ReplayBuffer.load(path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise StageError(
                    f"{self.ctx.workspace.rel(path)}: the replay buffer of the round-"
                    f"{entry.get('round')} checkpoint cannot be read ({e}); restore it, or "
                    "rerun with --set ditto.resume=false to train the rounds again"
                ) from e
        for ev in await self.run.start(decision, from_sft_init):
            yield ev
        if self.run.step == 0:
            self.buffer = ReplayBuffer(meta={"fingerprint": self.run.fingerprint})
            return
        rounds_done = self.run.step
        self.reference_path = str(entry.get("reference_path") or self.reference_path)
        self.last_name, self.last_sampler = str(entry["checkpoint"]), str(entry["sampler_path"])
        self.dpo_step = rounds_done * self.cfg.steps_per_round
        # Samples of the round in flight at the kill stay only when they came from the
        # checkpoint we resume from (they are then exactly what this round would sample).
        dropped = self.buffer.keep(
            lambda s: (
                s.round <= rounds_done
                or (s.round == rounds_done + 1 and s.checkpoint == self.last_name)
            )
        )
        yield LogLine(
            f"resuming after round {rounds_done}/{self.cfg.rounds} from {self.last_name} "
            f"({len(self.buffer.samples)} buffered samples"
            + (f", {dropped} dropped" if dropped else "")
            + ")"
        )

    async def train(self) -> AsyncIterator[Event]:
        svc, model = self.ctx.service_client(), self.model
        self.reference = _Reference(
            await resolve(
                svc.create_sampling_client(model_path=self.reference_path, base_model=model)
            ),
            self.reference_path,
        )
        self.probe = [self.to_datum(self.demos[0]["input"], self.demos[0]["output"])]
        total = self.cfg.rounds * self.cfg.steps_per_round
        label = f"ditto: round {self.run.step + 1}/{self.cfg.rounds}"
        yield Progress(self.dpo_step, total, label)
        async for ev in self.run.steps(
            self.one_round, label="ditto: rounds", checkpoint_every=1, progress=False
        ):
            if isinstance(ev, CheckpointSaved):
                self.last_name, self.last_sampler = ev.name, ev.sampler_path
            yield ev

    async def one_round(self, done: int) -> AsyncIterator[Event]:
        ctx, cfg, svc = self.ctx, self.cfg, self.ctx.service_client()
        rnd = done + 1
        if cfg.update_reference and self.reference.path != self.last_sampler:
            self.reference = _Reference(
                await resolve(
                    svc.create_sampling_client(model_path=self.last_sampler, base_model=self.model)
                ),
                self.last_sampler,
            )
            self.reference_path = self.last_sampler
            record_checkpoint(ctx.workspace.results_dir, "ditto", reference_path=self.last_sampler)
            yield LogLine(f"round {rnd}: reference moved to {self.last_name} (update_reference)")
        # What the reference says of one demonstration: constant unless update_reference.
        ref_lp = await self.reference.logprobs(self.probe)
        yield Metric("ditto/reference_logprob", rnd, float((ref_lp[0] * _w(self.probe[0])).sum()))
        async for ev in _sample_round(
            ctx,
            svc,
            self.renderer,
            self.renderer.tokenizer,
            self.model,
            self.demos,
            self.buffer,
            rnd,
            self.last_name,
            self.last_sampler,
            self.buffer_path,
        ):
            yield ev
        for s in range(1, cfg.steps_per_round + 1):
            ctx.check_cancel()
            for ev in await self._dpo(rnd):
                yield ev
            yield Progress(
                self.dpo_step,
                cfg.rounds * cfg.steps_per_round,
                f"ditto: round {rnd}/{cfg.rounds} step {s}/{cfg.steps_per_round}",
            )

    async def _dpo(self, rnd: int) -> list[Event]:
        cfg = self.cfg
        idx = batch_requests(self.dpo_step, len(self.demos), cfg.batch_prompts, cfg.seed + 1)
        rng = random.Random(f"ditto-pairs-{cfg.seed}-{self.dpo_step}")
        pairs, counts = draw_pairs(
            [self.demos[i] for i in idx],
            self.buffer,
            rnd,
            len(idx) * cfg.pairs_per_prompt,
            cfg.mix,
            rng,
            replay=cfg.replay,
            intermodel=cfg.intermodel,
        )
        metrics = await _dpo_step(self.ctx, self.run.tc, self.reference, pairs, self.to_datum)
        self.dpo_step += 1
        step = self.dpo_step
        out: list[Event] = [
            Metric("ditto/dpo_loss", step, metrics["dpo_loss"]),
            Metric("ditto/chosen_reward", step, metrics["chosen_reward"]),
            Metric("ditto/rejected_reward", step, metrics["rejected_reward"]),
            Metric("ditto/margin", step, metrics["margin"]),
            Metric("ditto/pair_accuracy", step, metrics["accuracy"]),
        ]
        return out + [Metric(f"ditto/pairs_{kind}", step, float(counts[kind])) for kind in KINDS]


def _w(d: tinker.Datum) -> Any:
    return d.loss_fn_inputs["weights"].to_torch().float()


def _finished(ctx: StageContext, out_path: Path, summary: str) -> StageFinished:
    ws = ctx.workspace
    outputs = [ws.rel(registry_path(ws.results_dir))]
    if ctx.config.ditto.sample_after:
        outputs.insert(0, ws.rel(out_path))
    return StageFinished(stage=ctx.stage, outputs=tuple(outputs), summary=summary)


async def _sft_init(
    ctx: StageContext, sft_run: TrainRun, train: list[dict[str, str]], to_datum: Any
) -> AsyncIterator[Event]:
    """LoRA SFT on the training demonstrations until the batch loss falls below
    ``sft_stop_loss`` (or ``sft_max_steps``), checkpointed like any training."""
    cfg = ctx.config.ditto
    data = [to_datum(d["input"], d["output"]) for d in train]
    b = min(cfg.batch_prompts, len(data))
    if sft_run.step == 0:
        yield LogLine(
            f"SFT init on {len(data)} training demonstrations: up to {cfg.sft_max_steps} steps "
            f"of {b}, lr {cfg.sft_lr}, LoRA rank {cfg.rank}; stops once the batch loss < "
            f"{cfg.sft_stop_loss}"
        )
    last = [float("nan")]

    async def one_step(step: int) -> AsyncIterator[Event]:
        batch = [data[i] for i in batch_requests(step, len(data), b, cfg.seed)]
        loss = last[0] = await supervised_step(sft_run.tc, batch, adam(ctx, cfg.sft_lr))
        yield Metric("ditto/sft_loss", step + 1, loss)
        yield Metric("ditto/sft_stop_loss", step + 1, cfg.sft_stop_loss)
        if loss < cfg.sft_stop_loss:
            sft_run.stop()
            yield LogLine(
                f"SFT init: batch loss {loss:.3f} < {cfg.sft_stop_loss} after {step + 1} steps: "
                "stopping"
            )

    async for ev in sft_run.steps(
        one_step, label="ditto: SFT init", checkpoint_every=cfg.checkpoint_every
    ):
        yield ev
    if not sft_run.stopped_early:
        yield LogLine(
            f"SFT init: {sft_run.step} steps, last batch loss {last[0]:.3f} "
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
    ctx: StageContext, tc: Any, reference: _Reference, pairs: list[Pair], to_datum: Any
) -> dict[str, float]:
    cfg = ctx.config.ditto
    data: list[tinker.Datum] = []
    for p in pairs:
        data += [to_datum(p.request, p.chosen), to_datum(p.request, p.rejected)]
    refs = await reference.logprobs(data)
    weights = [_w(d) for d in data]

    def loss_fn(_data: list[tinker.Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        return dpo_loss(logprobs, weights, refs, cfg.beta)

    fb = tc.forward_backward_custom(data, loss_fn)
    opt = tc.optim_step(adam(ctx, cfg.lr))
    result = await resolve(fb)
    await resolve(opt)
    return {k: float(v) for k, v in dict(result.metrics).items()}


async def _final_sampling(
    ctx: StageContext, sampler_path: str, out_path: Path
) -> AsyncIterator[Event]:
    if not ctx.config.ditto.sample_after:
        return
    from engine.llm.sampling import open_sampler

    sampler = await open_sampler(ctx, model_path=sampler_path)
    async for ev in sample_demo_inputs(
        ctx, sampler, ctx.workspace.load_demos(), out_path, system_prompt=None, source="ditto"
    ):
        yield ev
