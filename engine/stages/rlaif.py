"""Stage 9: RLAIF. Group sampling, pairwise tournaments judged by the reward model, policy-
gradient updates, and a live dev win rate against the initial policy.

Init (``rlaif.init``): the finished SFT checkpoint of the same policy model when there is one
("sft"), else (or with "base") a fresh LoRA on the base policy. The initial policy is also the
dev evaluator's opponent and the KL reference.

Each step:
  1. ``batch_size`` train prompts (results/rl_train_data.jsonl, seeded order, same on resume);
     ``group_size`` samples each from the current policy. Every sampling request of the step
     is submitted before any is awaited (one round trip).
  2. A pairwise tournament inside each group (engine.llm.judge.matchups: chunks of 4, every pair
     in a chunk, judged in both orders), judged by the reward-model checkpoint (else the base
     judge; ``rlaif.judge = "shorter"`` is a rule judge preferring shorter samples, the
     cookbook's demo, for checking the pipeline). Every judge request of the step, and the
     initial policy's logprobs for the KL estimate, are submitted together (one round trip).
  3. reward = (wins - losses) / matches - format_penalty when a sample ran out of tokens;
     group-centred advantages; zero-variance groups skipped; ``importance_sampling`` (or
     ``ppo``) loss with the sampler's logprobs, built with tinker-cookbook's RL data
     processing (Trajectory/TrajectoryGroup, compute_advantages, assemble_training_data);
     forward_backward and optim_step submitted together (one round trip).

Metrics per step: rl/reward, rl/decided_rate and rl/tie_rate (a decided matchup is one win and
one loss), rl/unparsable_rate, rl/position_consistency, rl/sample_tokens,
rl/sample_chars, rl/kl_init (mean
log p_current - log p_initial over sampled tokens), time/sampling, time/judging,
time/training. Every ``eval_every`` steps: current vs initial policy on the dev prompts (no
system prompt), both orders -> dev/win_rate with dev/win_rate_low/high (95% Wilson), and a few
dev samples with verdicts in the log.

Checkpoints every ``checkpoint_every`` steps, on cancel and at the end, as [rlaif] in
results/checkpoints.toml; a rerun resumes from the last one (optimizer included), losing at
most the step in flight. At the end: results/rl_model_outputs.json on the demonstrations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import tinker

from engine.eval.metrics.stats import win_rate
from engine.llm.judge import (
    ALMOST_NOTHING,
    MARGIN_CLIP,
    Comparison,
    JudgeRecord,
    JudgeStats,
    RuleJudge,
    has_zero_variance,
    margin_rewards,
    matchups,
    tournament_rewards,
)
from engine.llm.sampling import Sampler, open_sampler, resolve
from engine.run.context import StageContext, StageError
from engine.run.events import CheckpointSaved, Event, LogLine, Metric, StageFinished
from engine.run.supervised import batch_indices
from engine.run.train_run import Decision, TrainRun, adam, digest, section_settings
from engine.stages._policy_samples import sample_demo_inputs
from engine.stages.reward_model import (
    combine_settings,
    known_warnings,
    open_judge,
    trained_judge_entry,
)
from engine.store.checkpoints import latest_checkpoint, record_checkpoint, registry_path
from engine.store.results import RESULT_FILES, RL_DEV_FILE, RL_TRAIN_FILE, read_rl_prompts
from engine.store.split import split_fingerprint

OUTPUT = RESULT_FILES["rlaif"]
STAGE = "rlaif"
CHUNK = 4  # tournament chunk size (tinker-cookbook's default)


async def _gather(futures: Sequence[Any]) -> list[Any]:
    return list(await asyncio.gather(*(resolve(f) for f in futures)))


def _load_prompts(ctx: StageContext, name: str) -> list[dict[str, Any]]:
    loaded = read_rl_prompts(ctx.workspace.result(name))
    if loaded.error:
        raise StageError(loaded.error)
    return loaded.rows


def _init_checkpoint(ctx: StageContext) -> dict[str, Any] | None:
    if ctx.config.rlaif.init != "sft":
        return None
    entry = latest_checkpoint(ctx.workspace.results_dir, "sft")
    if (
        entry
        and entry.get("finished")
        and entry.get("sampler_path")
        and entry.get("state_path")
        and entry.get("base_model", ctx.model("policy")) == ctx.model("policy")
        and entry.get("backend", ctx.backend) == ctx.backend
    ):
        return entry
    return None


def _params(cfg: Any, renderer: Any, seed: int) -> tinker.SamplingParams:
    return tinker.SamplingParams(
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        seed=seed,
        stop=renderer.get_stop_sequences(),
    )


def build_training_data(
    prompts: Sequence[tinker.ModelInput],
    groups: Sequence[Sequence[Any]],
    rewards: Sequence[Sequence[float]],
) -> tuple[list[tinker.Datum], int]:
    """Datums for the groups with any reward variance, via tinker-cookbook's RL data
    processing; returns (data, groups skipped). ``groups[g]`` holds sampled sequences
    (``tokens``, ``logprobs``, ``stop_reason``)."""
    from tinker_cookbook.completers import TokensWithLogprobs
    from tinker_cookbook.rl.data_processing import assemble_training_data, compute_advantages
    from tinker_cookbook.rl.types import Trajectory, TrajectoryGroup, Transition

    kept = []
    for prompt, seqs, r in zip(prompts, groups, rewards, strict=True):
        if has_zero_variance(r):
            continue
        trajs = [
            Trajectory(
                transitions=[
                    Transition(
                        ob=prompt,
                        ac=TokensWithLogprobs(list(s.tokens), list(s.logprobs or [])),
                        reward=0.0,
                        episode_done=True,
                    )
                ],
                final_ob=tinker.ModelInput.empty(),
                stop_reason=s.stop_reason,
            )
            for s in seqs
        ]
        kept.append(TrajectoryGroup(trajs, list(r), [{} for _ in seqs]))
    if not kept:
        return [], len(groups)
    data, _meta = assemble_training_data(kept, compute_advantages(kept))
    data = [  # the sampler's mask is not a loss input
        tinker.Datum(
            model_input=d.model_input,
            loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items() if k != "mask"},
        )
        for d in data
    ]
    return data, len(groups) - len(kept)


def _judge_identity(ctx: StageContext) -> str:
    """Which judge the rewards come from: the rule, a trained checkpoint, or the base model."""
    if ctx.config.rlaif.judge == "shorter":
        return "rule: shorter"
    entry = trained_judge_entry(ctx)
    return str(entry["sampler_path"]) if entry else f"base: {ctx.model('judge')}"


def _verdict_rule(ctx: StageContext) -> str:
    """How the judge's two orders become a verdict (reward_model.combine, .tie_margin): it
    changes every reward, so it is an input of the run."""
    rm = ctx.config.reward_model
    return f"{rm.combine}, tie margin {rm.tie_margin}"


def step_rewards(
    cfg: Any, groups: Sequence[Sequence[Any]], pairs: Sequence[tuple[int, int]],
    records: Sequence[JudgeRecord],
) -> list[list[float]]:  # fmt: skip
    """Each group's rewards from its matchups' records (``len(pairs)`` per group, in order):
    ``rlaif.reward = "margin"``: the mean calibrated margin s (clipped), a record not decided
    by the calibrated rule (a sampled verdict, or ``reward_model.combine = "agree"``)
    counting as its verdict at full strength; ``"wins"``: wins minus losses over matches.
    Minus ``format_penalty`` for a sample that ran out of tokens."""
    rewards = []
    for g, group in enumerate(groups):
        recs = records[g * len(pairs) : (g + 1) * len(pairs)]
        stopped = [s.stop_reason == "stop" for s in group]
        if cfg.reward == "margin":
            graded = [
                (i, j, _graded(r)) for (i, j), r in zip(pairs, recs, strict=True)
            ]  # fmt: skip
            rewards.append(margin_rewards(len(group), graded, stopped, cfg.format_penalty))
        else:
            res = [(i, j, r.preference) for (i, j), r in zip(pairs, recs, strict=True)]
            rewards.append(tournament_rewards(len(group), res, stopped, cfg.format_penalty))
    return rewards


def _graded(r: JudgeRecord) -> float:
    if r.combined_by == "calibrated" and r.s is not None:
        return r.s
    return float(r.preference) * MARGIN_CLIP


def judge_step_metrics(stats: JudgeStats) -> dict[str, float]:
    """The judge's statistics for one step: decided and tied shares of the matchups, mean
    position bias (nats), unparsable rate, position consistency."""
    n_match = max(1, stats.comparisons)
    out = {
        "rl/decided_rate": (stats.wins_a + stats.wins_b) / n_match,
        "rl/tie_rate": stats.ties / n_match,
        "rl/unparsable_rate": stats.unparsable_rate,
    }
    if stats.consistency_rate is not None:
        out["rl/position_consistency"] = stats.consistency_rate
    if stats.mean_position_bias is not None:
        out["rl/position_bias"] = stats.mean_position_bias
    return out


def train_run_for(
    ctx: StageContext,
    train_rows: list[dict[str, Any]],
    init: dict[str, Any] | None,
    use_system: bool,
) -> TrainRun:
    """rlaif's lifecycle: its whole section, the prompts, the policy, the init checkpoint, the
    judge that gives the rewards, and the split."""
    model = ctx.model("policy")
    holdout = split_fingerprint(ctx.split())  # the prompts came from the training demos
    start = init["sampler_path"] if init else "base"
    return TrainRun(
        ctx,
        STAGE,
        section="rlaif",
        settings=section_settings(ctx.config.rlaif, "rlaif"),
        inputs={
            "data": digest(train_rows),
            "base_model": model,
            "init checkpoint": start,
            "judge": _judge_identity(ctx),
            "verdict rule": _verdict_rule(ctx),
            "split": holdout,
        },
        total=ctx.config.rlaif.steps,
        length_keys=("rlaif.steps",),
        fields={
            "base_model": model,
            "init": start,
            "use_system_prompt": use_system,
            "holdout": holdout,
        },
    )


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    cfg = ctx.config.rlaif
    train_rows = _load_prompts(ctx, RL_TRAIN_FILE)
    if not train_rows:
        raise StageError(
            f"{ws.rel(ws.result(RL_TRAIN_FILE))} not found or empty: run `persona run rl-prompts` first."
        )
    init = _init_checkpoint(ctx)
    if cfg.init == "sft" and init is None:
        yield LogLine("no finished SFT checkpoint for this policy: starting from the base model")
    # rl-prompts puts the system prompt into the train rows when there is one: evaluate gives
    # the checkpoint the same context
    use_system = any(
        m.get("role") == "system" for r in train_rows for m in r.get("prompt_conversation", [])
    )
    train_run = train_run_for(ctx, train_rows, init, use_system)
    decision = train_run.decide(resume=cfg.resume)
    yield train_run.explain(decision)
    if decision.action == "reuse" and decision.entry:
        # Training is done (e.g. killed while sampling): only the final sampling is left.
        reused = str(decision.entry["sampler_path"])
        try:
            sampler = (
                await open_sampler(ctx, role="policy", model_path=reused)
                if cfg.sample_after
                else None
            )
        except FileNotFoundError as e:
            yield LogLine(f"cannot reuse the finished training ({e}); training again", "warning")
            decision = Decision("fresh", "the finished checkpoint is gone")
        else:
            summary = f"reused the finished training ({cfg.steps} RL steps); checkpoint {reused}"
            async for ev in _finish(ctx, sampler, summary):
                yield ev
            return
    loop = _RlLoop(ctx, train_run, train_rows, init)
    async for ev in loop.train(decision):
        yield ev
    sampler = (
        await open_sampler(ctx, role="policy", model_path=loop.final_path)
        if cfg.sample_after
        else None
    )
    summary = f"{train_run.step} RL steps; checkpoint {loop.final_path}"
    async for ev in _finish(ctx, sampler, summary):
        yield ev


@dataclass
class _Step:
    """What one RL step produced, for its metrics."""

    groups: list[list[Any]]
    texts: list[list[str]]
    rewards: list[list[float]]
    stats: Any
    init_lps: list[Any]
    skipped: int
    times: tuple[float, float, float]


class _RlLoop:
    """The policy, its initial copy, the judge and the dev evaluation of one rlaif run."""

    def __init__(
        self,
        ctx: StageContext,
        train_run: TrainRun,
        train_rows: list[dict[str, Any]],
        init: dict[str, Any] | None,
    ) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.rlaif
        self.run = train_run
        self.rows = train_rows
        self.dev_rows = _load_prompts(ctx, RL_DEV_FILE)[: self.cfg.dev_prompts]
        self.init = init
        self.batch_size = min(self.cfg.batch_size, len(train_rows))
        self.pairs = matchups(self.cfg.group_size, CHUNK)
        self.final_path = ""

    async def open(self, decision: Decision) -> AsyncIterator[Event]:
        from engine.backends.renderers import get_renderer_for

        ctx, cfg, init = self.ctx, self.cfg, self.init
        svc = ctx.service_client()
        model = ctx.model("policy")

        async def new_client() -> Any:
            if init:
                return await resolve(svc.create_training_client_from_state(init["state_path"]))
            return await resolve(
                svc.create_lora_training_client(base_model=model, rank=cfg.rank, seed=cfg.seed)
            )

        for ev in await self.run.start(decision, new_client):
            yield ev
        if init and self.run.step == 0:
            yield LogLine(f"policy starts from the SFT checkpoint {init['sampler_path']}")
        self.tc = self.run.tc
        tokenizer = self.tc.get_tokenizer()
        self.renderer = get_renderer_for(model, tokenizer)
        self.decoder = Sampler(
            client=None, renderer=self.renderer, tokenizer=tokenizer, model=model
        )
        self.init_client = await resolve(
            svc.create_sampling_client(model_path=init["sampler_path"], base_model=model)
            if init
            else svc.create_sampling_client(base_model=model)
        )
        if cfg.judge == "shorter":
            self.judge = RuleJudge(**combine_settings(ctx))
            what = "rule judge (prefers shorter samples)"
        else:
            self.judge, what = await open_judge(ctx, concurrency=cfg.concurrency)
            for line in known_warnings(ctx, self.judge):
                yield LogLine(f"reward-model's check of this judge: {line}", "warning")
        yield LogLine(
            f"{cfg.steps} steps of {self.batch_size} prompts x {cfg.group_size} samples on "
            f"{model} ({ctx.backend}); {len(self.pairs)} matchups per group, both orders; "
            f"judge: {what}"
        )

    def decode(self, tokens: Sequence[int]) -> str:
        return self.decoder.decode(tokens)

    async def train(self, decision: Decision) -> AsyncIterator[Event]:
        cfg = self.cfg
        async for ev in self.open(decision):
            yield ev
        start = self.run.step
        self.current = await resolve(
            self.tc.save_weights_and_get_sampling_client(f"policy-{start:06d}")
        )
        entry = decision.entry or {}
        if (
            decision.action == "resume"
            and self._eval_due(start)
            and entry.get("dev_evaluated") != start
        ):
            # killed during the dev evaluation that follows this checkpoint: fill the gap
            async for ev in self.dev_eval(start):
                yield ev

        async def after(step: int) -> AsyncIterator[Event]:
            if self._eval_due(step):
                async for ev in self.dev_eval(step):
                    yield ev

        async for ev in self.run.steps(
            self.one_step, label="rlaif: steps", checkpoint_every=cfg.checkpoint_every, after=after
        ):
            if isinstance(ev, CheckpointSaved):
                self.final_path = ev.sampler_path
            yield ev

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(every) and step > 0 and (step % every == 0 or step == self.cfg.steps)

    async def one_step(self, step: int) -> AsyncIterator[Event]:
        """Sample, judge, train: a cancel between phases stops before the next one."""
        ctx, cfg = self.ctx, self.cfg
        t0 = time.perf_counter()
        rows = [
            self.rows[i] for i in batch_indices(step, len(self.rows), self.batch_size, cfg.seed)
        ]
        convs = [r["prompt_conversation"] for r in rows]
        prompts = [self.renderer.build_generation_prompt(c) for c in convs]
        futs = [  # every sample of the step in flight before any is awaited
            self.current.sample(
                prompt=p,
                num_samples=cfg.group_size,
                sampling_params=_params(
                    cfg, self.renderer, cfg.seed * 1_000_003 + step * 1_009 + k
                ),
            )
            for k, p in enumerate(prompts)
        ]
        groups = [list(r.sequences) for r in await _gather(futs)]
        ctx.check_cancel()
        t1 = time.perf_counter()
        texts = [[self.decode(s.tokens) for s in g] for g in groups]
        comps = [
            Comparison(convs[g], texts[g][i], texts[g][j], rows[g].get("rubric", ""))
            for g in range(len(groups))
            for i, j in self.pairs
        ]
        kl_futs = [
            self.init_client.compute_logprobs(
                tinker.ModelInput.from_ints(p.to_ints() + list(s.tokens))
            )
            for p, g in zip(prompts, groups, strict=True)
            for s in g
            if s.tokens
        ]
        self.judge.reset_stats()
        records, init_lps = await asyncio.gather(self.judge.judge(comps), _gather(kl_futs))
        stats = self.judge.stats
        ctx.check_cancel()
        t2 = time.perf_counter()
        rewards = step_rewards(cfg, groups, self.pairs, records)
        data, skipped = build_training_data(prompts, groups, rewards)
        if data:
            fb = self.tc.forward_backward(data, cfg.loss)  # submit both before awaiting
            opt = self.tc.optim_step(adam(ctx, cfg.lr))
            await resolve(fb)
            await resolve(opt)
        else:
            yield LogLine(f"step {step + 1}: every group tied; no update", "warning")
        self.current = await resolve(
            self.tc.save_weights_and_get_sampling_client(f"policy-{step + 1:06d}")
        )
        t3 = time.perf_counter()
        done = _Step(groups, texts, rewards, stats, init_lps, skipped, (t1 - t0, t2 - t1, t3 - t2))
        for ev in _step_metrics(step + 1, done):
            yield ev

    async def dev_eval(self, step: int) -> AsyncIterator[Event]:
        """Current vs initial policy on the dev prompts, both orders -> dev/win_rate."""
        if not self.dev_rows:
            return
        convs = [r["prompt_conversation"] for r in self.dev_rows]
        mis = [self.renderer.build_generation_prompt(c) for c in convs]
        params = _params(self.cfg, self.renderer, self.cfg.seed + 7)
        futs = [
            c.sample(prompt=m, num_samples=1, sampling_params=params)
            for m in mis
            for c in (self.current, self.init_client)
        ]
        res = await _gather(futs)
        self.ctx.check_cancel()
        mine = [self.decode(res[2 * k].sequences[0].tokens) for k in range(len(mis))]
        theirs = [self.decode(res[2 * k + 1].sequences[0].tokens) for k in range(len(mis))]
        comps = [
            Comparison(c, a, b, r.get("rubric", ""))
            for c, a, b, r in zip(convs, mine, theirs, self.dev_rows, strict=True)
        ]
        old = self.judge.reset_stats()
        try:
            records = await self.judge.judge(comps)
        finally:
            self.judge.stats = old
        for ev in _dev_result(step, records):
            yield ev
        for c, a, b, r in list(zip(convs, mine, theirs, records, strict=True))[:2]:
            verdict = {1: "current wins", -1: "initial wins"}.get(r.preference, "tie")
            yield LogLine(
                f"dev sample: {c[-1]['content'][:80]!r} -> current: {a[:160]!r} | "
                f"initial: {b[:100]!r} | {verdict} ({r.verdict_ab}/{r.verdict_ba})"
            )
        if step == self.run.last_saved:  # a resume at this checkpoint need not evaluate again
            record_checkpoint(self.ctx.workspace.results_dir, STAGE, dev_evaluated=step)


def _dev_result(step: int, records: Sequence[JudgeRecord]) -> list[Event]:
    """The dev win rate against the initial policy with its interval; where the judge decided
    (almost) none of the comparisons, a warning instead of a rate of ties."""
    wr = win_rate([r.preference for r in records])
    if wr.n and (wr.wins + wr.losses) / wr.n < ALMOST_NOTHING:
        return [
            LogLine(
                f"dev @ step {step}: the judge decided {wr.wins + wr.losses} of {wr.n} "
                "comparisons (the rest are ties): no win rate against the initial policy",
                "warning",
            )
        ]
    low, high = wr.interval
    return [
        Metric("dev/win_rate", step, wr.rate),
        Metric("dev/win_rate_low", step, low),
        Metric("dev/win_rate_high", step, high),
        LogLine(
            f"dev @ step {step}: win rate vs initial policy {wr.rate:.0%} "
            f"[{low:.0%}, {high:.0%}] ({wr.wins} W / {wr.losses} L / {wr.ties} T of {wr.n})"
        ),
    ]


def _step_metrics(step: int, s: _Step) -> list[Event]:
    """The step's metrics: reward, verdicts, sample lengths, KL to the start, phase times."""
    # KL(current || initial) estimate on the sampled tokens
    diffs = []
    k = 0
    for g in s.groups:
        for seq in g:
            if not seq.tokens:
                continue
            ref = s.init_lps[k][-len(seq.tokens) :]
            k += 1
            diffs += [a - b for a, b in zip(seq.logprobs or [], ref, strict=False) if b is not None]
    flat = [r for g in s.rewards for r in g]
    n_tokens = [len(seq.tokens) for g in s.groups for seq in g]
    stats = s.stats
    chars = [len(t.strip()) for g in s.texts for t in g]
    out: list[Event] = [
        Metric("rl/reward", step, sum(flat) / len(flat)),
        *(Metric(name, step, v) for name, v in judge_step_metrics(stats).items()),
    ]
    if stats.comparisons and (stats.decided_share or 0.0) < ALMOST_NOTHING:
        out.append(
            LogLine(
                f"step {step}: the judge decided {stats.wins_a + stats.wins_b} of "
                f"{stats.comparisons} matchups (the rest are ties): its rewards carry almost "
                "no signal this step",
                "warning",
            )
        )
    out += [
        Metric("rl/sample_tokens", step, sum(n_tokens) / len(n_tokens)),
        Metric("rl/sample_chars", step, sum(chars) / len(chars)),
        Metric(
            "rl/stopped_rate",
            step,
            sum(seq.stop_reason == "stop" for g in s.groups for seq in g) / len(n_tokens),
        ),
        Metric("rl/skipped_groups", step, float(s.skipped)),
    ]
    if diffs:
        out.append(Metric("rl/kl_init", step, sum(diffs) / len(diffs)))
    sampling, judging, training = s.times
    out += [
        Metric("time/sampling", step, sampling),
        Metric("time/judging", step, judging),
        Metric("time/training", step, training),
    ]
    return out


async def _finish(ctx: StageContext, sampler: Sampler | None, summary: str) -> AsyncIterator[Event]:
    """Sample the trained policy on every demo input (None: ``rlaif.sample_after`` is off),
    with the system prompt it trained with -> results/rl_model_outputs.json; then the stage's
    StageFinished."""
    ws = ctx.workspace
    outputs: list[str] = []
    if sampler is not None:
        system_prompt = str(ws.load_prompts().get("system_prompt", "")).strip() or None
        out = ws.result(OUTPUT)
        async for ev in sample_demo_inputs(
            ctx, sampler, ws.load_demos(), out, system_prompt=system_prompt, source="rlaif"
        ):
            yield ev
        outputs.append(ws.rel(out))
    yield StageFinished(
        stage=ctx.stage,
        outputs=(*outputs, ws.rel(registry_path(ws.results_dir))),
        summary=summary,
    )
