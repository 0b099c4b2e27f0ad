"""Stage 9: RLAIF. Group sampling, pairwise tournaments judged by the reward model, policy-
gradient updates, and a live dev win rate against the initial policy.

Init (``rlaif.init``): the finished SFT checkpoint of the same policy model when there is one
("sft"), else (or with "base") a fresh LoRA on the base policy. The initial policy is also the
dev evaluator's opponent and the KL reference.

Each step:
  1. ``batch_size`` train prompts (results/rl_train_data.jsonl, seeded order, same on resume);
     ``group_size`` samples each from the current policy. Every sampling request of the step
     is submitted before any is awaited (one round trip).
  2. A pairwise tournament inside each group (engine.judge.matchups: chunks of 4, every pair
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
import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import tinker

from engine.checkpoints import latest_checkpoint, registry_path
from engine.context import StageCancelled, StageContext, StageError
from engine.events import CheckpointSaved, Event, LogLine, Metric, Progress, StageFinished
from engine.judge import (
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
from engine.metrics.stats import win_rate
from engine.results import RESULT_FILES, RL_DEV_FILE, RL_TRAIN_FILE, read_rl_prompts
from engine.sampling import Sampler, open_sampler, resolve
from engine.split import split_fingerprint
from engine.stages._policy_samples import sample_demo_inputs
from engine.stages.reward_model import combine_settings, open_judge
from engine.stages.sft import batch_indices
from engine.training import cancel_checkpoint, save_checkpoint, step_name

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
                (
                    i,
                    j,
                    r.s
                    if r.combined_by == "calibrated" and r.s is not None
                    else float(r.preference) * MARGIN_CLIP,
                )
                for (i, j), r in zip(pairs, recs, strict=True)
            ]
            rewards.append(margin_rewards(len(group), graded, stopped, cfg.format_penalty))
        else:
            res = [(i, j, r.preference) for (i, j), r in zip(pairs, recs, strict=True)]
            rewards.append(tournament_rewards(len(group), res, stopped, cfg.format_penalty))
    return rewards


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


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    from engine.backends.renderers import get_renderer_for

    ws = ctx.workspace
    cfg = ctx.config.rlaif
    train_rows = _load_prompts(ctx, RL_TRAIN_FILE)
    if not train_rows:
        raise StageError(
            f"{ws.rel(ws.result(RL_TRAIN_FILE))} not found or empty: run `persona run rl-prompts` first."
        )
    dev_rows = _load_prompts(ctx, RL_DEV_FILE)[: cfg.dev_prompts]
    model = ctx.model("policy")
    svc = ctx.service_client()
    init = _init_checkpoint(ctx)
    if cfg.init == "sft" and init is None:
        yield LogLine("no finished SFT checkpoint for this policy: starting from the base model")
    batch_size = min(cfg.batch_size, len(train_rows))
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                train_rows,
                model,
                init and init["sampler_path"],
                cfg.rank,
                cfg.lr,
                batch_size,
                cfg.group_size,
                cfg.seed,
                cfg.loss,
                cfg.max_tokens,
                cfg.judge,
                ctx.backend,
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]

    # rl-prompts puts the system prompt into the train rows when there is one: evaluate gives
    # the checkpoint the same context
    use_system = any(
        m.get("role") == "system" for r in train_rows for m in r.get("prompt_conversation", [])
    )
    holdout = split_fingerprint(ctx.split())  # the prompts came from the training demos

    prev = latest_checkpoint(ws.results_dir, STAGE)
    if (
        cfg.resume
        and prev
        and prev.get("finished")
        and prev.get("fingerprint") == fingerprint
        and prev.get("sampler_path")
        and int(prev.get("step", 0)) == cfg.steps
    ):
        # Training is done (e.g. killed while sampling): only the final sampling is left.
        reused = str(prev["sampler_path"])
        yield LogLine(
            f"training already finished ({reused}, step {cfg.steps}): reusing it"
            + (", sampling only" if cfg.sample_after else "")
            + "; --set rlaif.resume=false trains again"
        )
        try:
            sampler = (
                await open_sampler(ctx, role="policy", model_path=reused)
                if cfg.sample_after
                else None
            )
        except FileNotFoundError as e:
            yield LogLine(f"cannot reuse the finished training ({e}); training again", "warning")
        else:
            summary = f"reused the finished training ({cfg.steps} RL steps); checkpoint {reused}"
            async for ev in _finish(ctx, sampler, summary):
                yield ev
            return
    start_step, tc = 0, None
    if (
        cfg.resume
        and prev
        and not prev.get("finished")
        and prev.get("fingerprint") == fingerprint
        and prev.get("state_path")
        and int(prev.get("step", 0)) < cfg.steps
    ):
        try:
            tc = await resolve(
                svc.create_training_client_from_state_with_optimizer(prev["state_path"])
            )
            start_step = int(prev["step"])
            yield LogLine(f"resuming from step {start_step} ({prev['state_path']})")
        except FileNotFoundError as e:
            yield LogLine(f"cannot resume ({e}); starting over", "warning")
    if tc is None:
        if init:
            tc = await resolve(svc.create_training_client_from_state(init["state_path"]))
            yield LogLine(f"policy starts from the SFT checkpoint {init['sampler_path']}")
        else:
            tc = await resolve(
                svc.create_lora_training_client(base_model=model, rank=cfg.rank, seed=cfg.seed)
            )
    tokenizer = tc.get_tokenizer()
    renderer = get_renderer_for(model, tokenizer)
    if init:
        init_client = await resolve(
            svc.create_sampling_client(model_path=init["sampler_path"], base_model=model)
        )
    else:
        init_client = await resolve(svc.create_sampling_client(base_model=model))
    if cfg.judge == "shorter":
        judge, what = RuleJudge(**combine_settings(ctx)), "rule judge (prefers shorter samples)"
    else:
        judge, what = await open_judge(ctx, concurrency=cfg.concurrency)
    pairs = matchups(cfg.group_size, CHUNK)
    yield LogLine(
        f"{cfg.steps} steps of {batch_size} prompts x {cfg.group_size} samples on {model} "
        f"({ctx.backend}); {len(pairs)} matchups per group, both orders; judge: {what}"
    )

    def decode(tokens: Sequence[int]) -> str:
        return Sampler(client=None, renderer=renderer, tokenizer=tokenizer, model=model).decode(
            tokens
        )

    async def save(step: int, name: str, finished: bool) -> CheckpointSaved:
        return await save_checkpoint(
            ctx,
            tc,
            STAGE,
            name,
            step=step,
            total_steps=cfg.steps,
            finished=finished,
            fingerprint=fingerprint,
            base_model=model,
            init=init["sampler_path"] if init else "base",
            use_system_prompt=use_system,
            holdout=holdout,
        )

    async def dev_eval(step: int, current: Any) -> AsyncIterator[Event]:
        if not dev_rows:
            return
        convs = [r["prompt_conversation"] for r in dev_rows]
        mis = [renderer.build_generation_prompt(c) for c in convs]
        params = _params(cfg, renderer, cfg.seed + 7)
        futs = [
            c.sample(prompt=m, num_samples=1, sampling_params=params)
            for m in mis
            for c in (current, init_client)
        ]
        res = await _gather(futs)
        mine = [decode(res[2 * k].sequences[0].tokens) for k in range(len(mis))]
        theirs = [decode(res[2 * k + 1].sequences[0].tokens) for k in range(len(mis))]
        comps = [
            Comparison(c, a, b, r.get("rubric", ""))
            for c, a, b, r in zip(convs, mine, theirs, dev_rows, strict=True)
        ]
        old = judge.reset_stats()
        try:
            records = await judge.judge(comps)
        finally:
            judge.stats = old
        wr = win_rate([r.preference for r in records])
        low, high = wr.interval
        yield Metric("dev/win_rate", step, wr.rate)
        yield Metric("dev/win_rate_low", step, low)
        yield Metric("dev/win_rate_high", step, high)
        yield LogLine(
            f"dev @ step {step}: win rate vs initial policy {wr.rate:.0%} "
            f"[{low:.0%}, {high:.0%}] ({wr.wins} W / {wr.losses} L / {wr.ties} T of {wr.n})"
        )
        for c, a, b, r in list(zip(convs, mine, theirs, records, strict=True))[:2]:
            verdict = {1: "current wins", -1: "initial wins"}.get(r.preference, "tie")
            yield LogLine(
                f"dev sample: {c[-1]['content'][:80]!r} -> current: {a[:160]!r} | "
                f"initial: {b[:100]!r} | {verdict} ({r.verdict_ab}/{r.verdict_ba})"
            )

    current = await resolve(tc.save_weights_and_get_sampling_client(f"policy-{start_step:06d}"))
    yield Progress(start_step, cfg.steps, "rlaif: steps")
    step = last_saved = start_step
    try:
        while step < cfg.steps:
            ctx.check_cancel()
            t0 = time.perf_counter()
            rows = [
                train_rows[i] for i in batch_indices(step, len(train_rows), batch_size, cfg.seed)
            ]
            convs = [r["prompt_conversation"] for r in rows]
            prompts = [renderer.build_generation_prompt(c) for c in convs]
            futs = [  # every sample of the step in flight before any is awaited
                current.sample(
                    prompt=p,
                    num_samples=cfg.group_size,
                    sampling_params=_params(cfg, renderer, cfg.seed * 1_000_003 + step * 1_009 + k),
                )
                for k, p in enumerate(prompts)
            ]
            groups = [list(r.sequences) for r in await _gather(futs)]
            t1 = time.perf_counter()
            texts = [[decode(s.tokens) for s in g] for g in groups]
            comps = [
                Comparison(convs[g], texts[g][i], texts[g][j], rows[g].get("rubric", ""))
                for g in range(len(groups))
                for i, j in pairs
            ]
            kl_futs = [
                init_client.compute_logprobs(
                    tinker.ModelInput.from_ints(p.to_ints() + list(s.tokens))
                )
                for p, g in zip(prompts, groups, strict=True)
                for s in g
                if s.tokens
            ]
            judge.reset_stats()
            records, init_lps = await asyncio.gather(judge.judge(comps), _gather(kl_futs))
            stats = judge.stats
            t2 = time.perf_counter()
            rewards = step_rewards(cfg, groups, pairs, records)
            data, skipped = build_training_data(prompts, groups, rewards)
            if data:
                fb = tc.forward_backward(data, cfg.loss)  # submit both before awaiting
                opt = tc.optim_step(
                    tinker.AdamParams(learning_rate=cfg.lr, beta1=0.9, beta2=0.95, eps=1e-8)
                )
                await resolve(fb)
                await resolve(opt)
            else:
                yield LogLine(f"step {step + 1}: every group tied; no update", "warning")
            current = await resolve(
                tc.save_weights_and_get_sampling_client(f"policy-{step + 1:06d}")
            )
            t3 = time.perf_counter()
            step += 1

            # KL(current || initial) estimate on the sampled tokens
            diffs = []
            k = 0
            for g in groups:
                for s in g:
                    if not s.tokens:
                        continue
                    ref = init_lps[k][-len(s.tokens) :]
                    k += 1
                    diffs += [
                        a - b for a, b in zip(s.logprobs or [], ref, strict=False) if b is not None
                    ]
            flat = [r for g in rewards for r in g]
            n_tokens = [len(s.tokens) for g in groups for s in g]
            yield Metric("rl/reward", step, sum(flat) / len(flat))
            for name, value in judge_step_metrics(stats).items():
                yield Metric(name, step, value)
            yield Metric("rl/sample_tokens", step, sum(n_tokens) / len(n_tokens))
            chars = [len(t.strip()) for g in texts for t in g]
            yield Metric("rl/sample_chars", step, sum(chars) / len(chars))
            yield Metric(
                "rl/stopped_rate",
                step,
                sum(s.stop_reason == "stop" for g in groups for s in g) / len(n_tokens),
            )
            yield Metric("rl/skipped_groups", step, float(skipped))
            if diffs:
                yield Metric("rl/kl_init", step, sum(diffs) / len(diffs))
            yield Metric("time/sampling", step, t1 - t0)
            yield Metric("time/judging", step, t2 - t1)
            yield Metric("time/training", step, t3 - t2)
            yield Progress(step, cfg.steps, "rlaif: steps")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                yield await save(step, step_name(step), finished=False)
                last_saved = step
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                async for ev in dev_eval(step, current):
                    yield ev
    except StageCancelled:
        async for ev in cancel_checkpoint(save, step, last_saved, cfg.steps):
            yield ev
        raise
    final = await save(step, "final", finished=True)
    yield final

    sampler = (
        await open_sampler(ctx, role="policy", model_path=final.sampler_path)
        if cfg.sample_after
        else None
    )
    async for ev in _finish(ctx, sampler, f"{step} RL steps; checkpoint {final.sampler_path}"):
        yield ev


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
