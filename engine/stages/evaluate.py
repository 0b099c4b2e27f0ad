"""Stage 11: every method on the held-out requests -> results/evaluation.json + results/report.md.

Methods: ``baseline`` (the base policy), ``prompting`` (with the system prompt of
data/prompts.toml), ``few-shot`` (the base policy with the *training* demonstrations as earlier
user/assistant turns), and every policy checkpoint in results/checkpoints.toml (sft, rlaif,
ditto, ...; the reward model is the judge, not a method). ``evaluate.methods`` narrows the list.

For each method and held-out demonstration (``ctx.split().holdout``; nothing trains on them):

1. NLL per token of the person's own text given the request, in the method's own context;
2. ``evaluate.samples`` samples: stylometric distance to the person's training texts, MiniLM
   similarity to the person's text for the same request and to the person's centroid;
3. the judge (the reward-model checkpoint when there is one, else the base judge model) on
   every pair of methods, sample i against sample i, the person's text as the reference,
   the rubric, both orders (a disagreement is a tie); and each method against the base on the
   RL dev prompts (results/rl_dev_data.jsonl) without a reference;
4. the person's blind A/B picks (results/human_preferences.jsonl) per pair, and the judge's
   agreement with them;
5. cost: sampling time and tokens per method, training time/steps from each run's events.

A checkpoint records the held-out set it trained with (``holdout``, engine.store.split.split_fingerprint);
one trained with another set (demonstrations added, a held-out request edited) or with none
recorded is still evaluated, with a warning, ``"split_changed": true`` in its method entry and a
note next to it in the report: it may have trained on the requests it is measured on. The
judge is opened (reward_model.open_judge) before any sampling, so a bad judge fails at once.

Every request of a phase is submitted before any is awaited (the local service batches
them; Tinker pipelines them). Writes results/evaluation.json, evaluation_samples.jsonl,
evaluation_judgements.jsonl, then the report (engine.eval.report).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import tinker

from engine.eval import evaluation as ev
from engine.eval.metrics.likelihood import target_nlls
from engine.eval.metrics.stylometry import (
    spread_of,
    style_distance,
    style_distance_by_feature,
    text_profile,
)
from engine.eval.paired import paired_comparisons, per_demo_tables
from engine.llm.fixups import trim_repetition
from engine.llm.judge import Comparison, Judge
from engine.llm.sampling import Sampler, as_completed_tasks, open_sampler, resolve
from engine.run.context import StageContext, StageError
from engine.run.events import Event, LogLine, Metric, Progress, SampleProduced, StageFinished
from engine.stages.reward_model import judge_checkpoint, open_judge
from engine.store import results
from engine.store.checkpoints import read_registry
from engine.store.split import split_fingerprint
from engine.store.workspace import RESULT_FILES

OUTPUT = RESULT_FILES["evaluate"]
JUDGE_STAGE = "reward-model"
NOT_POLICIES = {JUDGE_STAGE}
# Comparisons judged per batch: both orders of 16 are 32 prompts (64 scoring requests), a
# full batch for the local service and twice the default requests in flight on Tinker, and
# few enough that the progress bar moves every few seconds, not once after minutes.
JUDGE_CHUNK = 16

Messages = list[dict[str, str]]


@dataclass
class Method:
    name: str
    kind: str  # "base" | "prompt" | "few-shot" | "checkpoint"
    sampler: Sampler
    system_prompt: str | None = None
    examples: list[dict[str, str]] = field(default_factory=list)
    entry: dict[str, Any] = field(default_factory=dict)
    split_changed: bool = False  # trained with another held-out set: it may have seen these

    def context(self, user_turns: Messages) -> Messages:
        """The method's conversation for a request: its system prompt or examples, then the
        request's own turns (any system turn in them is replaced by the method's)."""
        msgs: Messages = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        for ex in self.examples:
            msgs += [
                {"role": "user", "content": ex["input"]},
                {"role": "assistant", "content": ex["output"]},
            ]
        return msgs + [m for m in user_turns if m["role"] != "system"]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": ev.method_label(self.name),
            "kind": self.kind,
            "system_prompt": bool(self.system_prompt),
            "examples": len(self.examples),
            "sampler_path": self.entry.get("sampler_path"),
            "run": self.entry.get("run"),
            "step": self.entry.get("step"),
            **({"split_changed": self.split_changed} if self.kind == "checkpoint" else {}),
        }


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def _dev_turns(row: dict[str, Any]) -> Messages | None:
    conv = row.get("prompt_conversation")
    if isinstance(conv, str):
        return _user(conv)
    if not isinstance(conv, list):
        text = row.get("input") or row.get("prompt")
        return _user(text) if isinstance(text, str) and text.strip() else None
    turns = [
        {"role": str(m.get("role")), "content": str(m.get("content", ""))}
        for m in conv
        if isinstance(m, dict) and m.get("role") in ("user", "assistant")
    ]
    return turns if turns and turns[-1]["role"] == "user" else None


async def _gather(coros: list[Awaitable[Any]]) -> list[Any]:
    """All at once (each is submitted before any is awaited); cancel the rest on failure."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _off_loop(ctx: StageContext, fn: Any) -> Any:
    """Blocking torch work off the event loop: on the local service's compute thread where
    there is one (one OpenMP team per process keeps the service at full speed), else on a
    worker thread."""
    on_compute = getattr(ctx.service_client(), "run_on_compute_thread", None)
    if callable(on_compute):
        return await on_compute(fn)
    return await asyncio.to_thread(fn)


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    ws = ctx.workspace
    cfg = ctx.config.evaluate
    t_start = time.time()
    split = ctx.split()
    if not split.holdout:
        raise StageError(
            (split.warning or "No demonstration is held out.")
            + ". Nothing can be evaluated fairly: every demonstration is training data. "
            "Add demonstrations in the Demonstrations tab (with 5 or more one is held out, "
            "with 8 or more two), or set data.holdout, then rerun the trained stages and evaluate."
        )
    train, held = split.train, split.holdout
    all_inputs = [d["input"] for d in ws.load_demos()]
    demo_index = [all_inputs.index(d["input"]) for d in held]
    prompts = ws.load_prompts()
    system_prompt = str(prompts.get("system_prompt", "")).strip()
    rubric = str(prompts.get("rubric", "")).strip()
    registry = read_registry(ws.results_dir, strict=True)
    holdout_fp = split_fingerprint(split)
    yield LogLine(
        f"{len(held)} held-out requests (demonstrations {[i + 1 for i in demo_index]}), "
        f"{len(train)} training demonstrations"
    )

    # -- methods ------------------------------------------------------------------------
    base = await open_sampler(ctx, role="policy")
    few = train[: cfg.few_shot_examples] if cfg.few_shot_examples else train
    methods = [Method("baseline", "base", base)]
    if system_prompt:
        methods.append(Method("prompting", "prompt", base, system_prompt=system_prompt))
    else:
        yield LogLine(
            "no system prompt in data/prompts.toml: skipping the prompted method", "warning"
        )
    methods.append(Method("few-shot", "few-shot", base, examples=few))
    for name, entry in registry.items():
        if name in NOT_POLICIES or not isinstance(entry, dict) or not entry.get("sampler_path"):
            continue
        if cfg.methods and name not in cfg.methods:
            continue
        base_model = entry.get("base_model") or ctx.model("policy")
        if base_model != ctx.model("policy"):
            yield LogLine(
                f"{name}: trained on {base_model}, not the policy {ctx.model('policy')}: skipped",
                "warning",
            )
            continue
        if entry.get("backend") not in (None, ctx.backend):
            yield LogLine(f"{name}: trained on backend {entry['backend']}: skipped", "warning")
            continue
        if entry.get("finished") is False:
            yield LogLine(
                f"{name}: its run did not finish; evaluating its last checkpoint", "warning"
            )
        try:
            sampler = await open_sampler(ctx, role="policy", model_path=str(entry["sampler_path"]))
        except (FileNotFoundError, ValueError) as e:
            yield LogLine(f"{name}: cannot open {entry['sampler_path']} ({e}): skipped", "warning")
            continue
        # the context it trained in (recorded by sft and rlaif; older entries: sft's setting)
        use_system = bool(
            entry.get("use_system_prompt", name == "sft" and ctx.config.sft.use_system_prompt)
        )
        changed = entry.get("holdout") != holdout_fp
        if changed:
            yield LogLine(
                f"{name}: "
                + (
                    "trained before the held-out set was recorded with checkpoints"
                    if not entry.get("holdout")
                    else "trained with another held-out set (demonstrations were added or a "
                    "held-out request edited since)"
                )
                + ": it may have trained on requests it is measured on; evaluating it anyway, "
                f"marked in the report (rerun {name} to measure it fairly)",
                "warning",
            )
        methods.append(
            Method(
                name,
                "checkpoint",
                sampler,
                system_prompt=system_prompt if use_system else None,
                entry=entry,
                split_changed=changed,
            )
        )
    if cfg.methods:
        unknown = [m for m in cfg.methods if m not in {x.name for x in methods}]
        methods = [m for m in methods if m.name in cfg.methods]
        if unknown:
            yield LogLine(f"evaluate.methods: no results for {', '.join(unknown)}", "warning")
        if not methods:
            raise StageError(f"evaluate.methods = {list(cfg.methods)}: none of them has results.")
    names = [m.name for m in methods]
    yield LogLine(f"methods: {', '.join(names)}")
    dropped = results.methods_dropped(ws.results_dir, names)
    if dropped:  # never a narrower result over a wider one without saying so
        yield LogLine(results.narrower_warning(dropped), "warning")

    # -- the judge, opened before any sampling: a bad judge fails now, not after it ----------
    judge: Judge | None = None
    judge_info: dict[str, Any] = {"used": False}
    if cfg.judge and len(methods) >= 2 and rubric:
        try:
            judge, what = await open_judge(ctx, concurrency=cfg.concurrency)
        except (FileNotFoundError, ValueError) as e:
            raise StageError(
                f"cannot open the judge ({e}): rerun the reward-model stage, or set "
                "reward_model.train = false there to use the base judge, or evaluate.judge = false"
            ) from e
        judge_info = {
            "used": False,
            "model": ctx.model("judge"),
            "checkpoint": judge_checkpoint(judge),
            "mode": judge.mode,
        }
        yield LogLine(f"judge: {what}")

    sampling = ctx.config.sampling
    sem = asyncio.Semaphore(cfg.concurrency)
    params_common = {
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": sampling.top_p,
    }

    async def sample(m: Method, turns: Messages, n: int, seed: int) -> list[tuple[str, int]]:
        prompt = m.sampler.renderer.build_generation_prompt(m.context(turns))
        params = tinker.SamplingParams(
            **params_common, seed=seed, stop=m.sampler.renderer.get_stop_sequences()
        )
        async with sem:
            ctx.check_cancel()
            result = await resolve(
                m.sampler.client.sample(prompt=prompt, num_samples=n, sampling_params=params)
            )
        out = []
        for seq in result.sequences:
            text = m.sampler.decode(seq.tokens)
            out.append((trim_repetition(text) if sampling.trim_repeats else text, len(seq.tokens)))
        return out

    # -- 1. NLL of the person's held-out texts ----------------------------------------------
    yield Progress(0, len(methods), "evaluate: likelihood")
    nll_tasks = [
        target_nlls(
            m.sampler.client,
            m.sampler.renderer,
            [(m.context(_user(d["input"])), d["output"]) for d in held],
        )
        for m in methods
    ]
    nlls = await _gather(nll_tasks)
    metrics: dict[str, dict[str, Any]] = {}
    nll_rows = []
    for m, per in zip(methods, nlls, strict=True):
        metrics[m.name] = {"nll": ev.nll_summary(per)}
        if metrics[m.name]["nll"]["mean"] is not None:
            yield Metric(f"eval/nll/{m.name}", 0, metrics[m.name]["nll"]["mean"])
        for r, x in enumerate(per):
            nll_rows.append(
                {
                    "kind": "nll",
                    "method": m.name,
                    "request": r,
                    "input": held[r]["input"],
                    "nll_total": x.total,
                    "tokens": x.tokens,
                    "nll_mean": x.mean,
                }
            )
    ctx.check_cancel()
    yield Progress(len(methods), len(methods), "evaluate: likelihood")

    # -- 2. samples on the held-out requests -----------------------------------------------
    k = cfg.samples
    jobs: list[tuple[Method, int]] = [(m, r) for m in methods for r in range(len(held))]
    t0 = time.time()
    finished_at: dict[str, float] = {}
    total = len(jobs)
    yield Progress(0, total, "evaluate: sampling")

    async def job(m: Method, r: int) -> tuple[Method, int, list[tuple[str, int]]]:
        out = await sample(m, _user(held[r]["input"]), k, cfg.seed + r)
        finished_at[m.name] = time.time() - t0
        return m, r, out

    outputs: dict[tuple[str, int], list[tuple[str, int]]] = {}
    done = 0
    async with aclosing(as_completed_tasks(job(m, r) for m, r in jobs)) as stream:
        async for m, r, out in stream:
            outputs[(m.name, r)] = out
            done += 1
            for text, _n in out[:1]:
                yield SampleProduced(input=held[r]["input"], output=text, source=m.name)
            yield Progress(done, total, "evaluate: sampling")
            ctx.check_cancel()

    person_texts = [d["output"] for d in train]
    person_len = [text_profile(t)["length_words"] for t in person_texts]
    samples: list[dict[str, Any]] = []
    for m in methods:
        for r, d in enumerate(held):
            for s, (text, ntok) in enumerate(outputs[(m.name, r)]):
                samples.append(
                    {
                        "kind": "sample",
                        "id": f"{m.name}/r{r}/s{s}",
                        "method": m.name,
                        "request": r,
                        "demo_index": demo_index[r],
                        "input": d["input"],
                        "person_output": d["output"],
                        "output": text,
                        "tokens": ntok,
                        "length_words": text_profile(text)["length_words"],
                        "style_distance": style_distance([text], person_texts)
                        if text.strip()
                        else None,
                    }
                )
    empty = sum(1 for s in samples if not s["output"].strip())
    if empty:
        yield LogLine(
            f"{empty} of {len(samples)} samples are empty (the model stopped at once)", "warning"
        )

    # -- 2b. embeddings -------------------------------------------------------------------
    if cfg.embedding:
        try:
            from engine.eval.metrics import embedding

            texts = [s["output"] for s in samples]
            paired = await _off_loop(
                ctx,
                functools.partial(
                    embedding.paired_similarity, texts, [s["person_output"] for s in samples]
                ),
            )
            centre = await _off_loop(
                ctx, functools.partial(embedding.centroid_similarity, texts, person_texts)
            )
            for s, p, c in zip(samples, paired, centre, strict=True):
                s["similarity"], s["centroid_similarity"] = p, c
        except Exception as e:  # a missing package must not cost the rest of the evaluation
            yield LogLine(f"embedding similarity skipped: {e}", "warning")
    ctx.check_cancel()

    for m in methods:
        mine = [s for s in samples if s["method"] == m.name]
        texts = [s["output"] for s in mine if s["output"].strip()]
        met = metrics[m.name]
        met["style_distance"] = ev.mean_interval(
            [s["style_distance"] for s in mine if s["style_distance"] is not None], (0.0, math.inf)
        )
        if texts:
            met["style_distance"]["profile_distance"] = style_distance(texts, person_texts)
            met["style_distance"]["by_feature"] = style_distance_by_feature(texts, person_texts)
        met["embedding_similarity"] = ev.mean_interval(  # a cosine: its interval stays in [-1, 1]
            [s["similarity"] for s in mine if "similarity" in s], (-1.0, 1.0)
        )
        met["centroid_similarity"] = ev.mean_interval(
            [s["centroid_similarity"] for s in mine if "centroid_similarity" in s], (-1.0, 1.0)
        )
        met["length_words"] = ev.mean_interval([s["length_words"] for s in mine], (0.0, math.inf))
        met["cost"] = {
            "samples": len(mine),
            "sampled_tokens": sum(s["tokens"] for s in mine),
            "sampling_seconds": finished_at.get(m.name),
            "training": ev.training_cost(ws.root / m.entry["run"] if m.entry.get("run") else None),
            "data": _data_needed(ctx, m, len(train)),
        }
        for key in ("style_distance", "embedding_similarity"):
            if met[key]["mean"] is not None:
                yield Metric(f"eval/{key}/{m.name}", 0, met[key]["mean"])

    # -- 3. the judge -------------------------------------------------------------------------
    judgements: list[dict[str, Any]] = []
    dev_rates: dict[str, Any] = {}
    dev_samples: list[dict[str, Any]] = []
    if judge is not None:
        comps, meta = [], []
        for i, a in enumerate(methods):
            for b in methods[i + 1 :]:
                for r, d in enumerate(held):
                    for s in range(min(len(outputs[(a.name, r)]), len(outputs[(b.name, r)]))):
                        comps.append(
                            Comparison(
                                _user(d["input"]),
                                outputs[(a.name, r)][s][0],
                                outputs[(b.name, r)][s][0],
                                rubric,
                                reference=d["output"],
                            )
                        )
                        meta.append(("heldout", a.name, b.name, r, s, d["input"]))
        # dev prompts: one sample of each method, each against the base
        dev_rows = (
            ev.read_rows(ws.result(ev.DEV_FILE))[: cfg.dev_prompts] if cfg.dev_prompts else []
        )
        dev_turns = [t for t in (_dev_turns(x) for x in dev_rows) if t]
        if dev_turns and "baseline" in names:
            yield Progress(0, len(dev_turns) * len(methods), "evaluate: dev samples")
            dev_out = await _gather(
                [
                    sample(m, t, 1, cfg.seed + 10_000 + j)
                    for m in methods
                    for j, t in enumerate(dev_turns)
                ]
            )
            by = {
                (m.name, j): dev_out[i * len(dev_turns) + j][0]
                for i, m in enumerate(methods)
                for j in range(len(dev_turns))
            }
            yield Progress(
                len(dev_turns) * len(methods),
                len(dev_turns) * len(methods),
                "evaluate: dev samples",
            )
            for (mname, j), (text, ntok) in by.items():
                dev_samples.append(
                    {
                        "kind": "dev_sample",
                        "id": f"{mname}/dev{j}",
                        "method": mname,
                        "request": j,
                        "input": dev_turns[j][-1]["content"],
                        "output": text,
                        "tokens": ntok,
                    }
                )
            for m in methods:
                if m.name == "baseline":
                    continue
                for j, t in enumerate(dev_turns):
                    comps.append(Comparison(t, by[(m.name, j)][0], by[("baseline", j)][0], rubric))
                    meta.append(("dev", m.name, "baseline", j, 0, t[-1]["content"]))
        elif cfg.dev_prompts and not dev_turns:
            yield LogLine(f"no {ev.DEV_FILE} (run rl-prompts): no dev win rates", "info")
        yield Progress(0, len(comps), "evaluate: judging")
        records: list[Any] = []
        for start in range(0, len(comps), JUDGE_CHUNK):
            ctx.check_cancel()
            records += await judge.judge(comps[start : start + JUDGE_CHUNK])
            yield Progress(len(records), len(comps), "evaluate: judging")
        for (kind, a, b, r, s, text), rec in zip(meta, records, strict=True):
            ida, idb = (
                (f"{a}/r{r}/s{s}", f"{b}/r{r}/s{s}")
                if kind == "heldout"
                else (f"{a}/dev{r}", f"{b}/dev{r}")
            )
            judgements.append(
                {
                    "set": kind,
                    "a": ida,
                    "b": idb,
                    "method_a": a,
                    "method_b": b,
                    "request": r,
                    "input": text,
                    "preference": rec.preference,
                    **{k2: v for k2, v in rec.as_dict().items() if k2 != "preference"},
                }
            )
        judge_info["stats"] = judge.stats.as_dict()
        judge_info["used"] = True
        held_recs = [
            (j["method_a"], j["method_b"], j["preference"])
            for j in judgements
            if j["set"] == "heldout"
        ]
        for m in methods:
            wr = ev.overall_record(held_recs, m.name)
            metrics[m.name]["judge_vs_all"] = wr.as_dict()
            if wr.n:
                yield Metric(f"eval/judge_win_rate/{m.name}", 0, wr.rate or 0.0)
            dev = [
                (j["method_a"], j["method_b"], j["preference"])
                for j in judgements
                if j["set"] == "dev" and j["method_a"] == m.name
            ]
            if dev:
                dwr = ev.overall_record(dev, m.name)
                dev_rates[m.name] = dwr.as_dict()
                metrics[m.name]["dev_vs_baseline"] = dwr.as_dict()
        matrix = ev.judge_matrix(held_recs, names)
    else:
        why = (
            "evaluate.judge = false"
            if not cfg.judge
            else "no rubric in data/prompts.toml"
            if not rubric
            else "one method"
        )
        yield LogLine(f"judge skipped ({why})", "warning")
        matrix = ev.judge_matrix([], names)
    wins = ev.judge_wins_per_sample([j for j in judgements if j["set"] == "heldout"])
    for s in samples:
        s["judge"] = wins.get(s["id"], [0, 0, 0])

    # -- 4. the person's picks ----------------------------------------------------------------
    picks = ev.read_preferences(ws.results_dir)
    for problem in results.preference_problems(ws.results_dir):
        yield LogLine(problem, "warning")
    human = ev.human_summary(picks, [j for j in judgements if j["set"] == "heldout"], names)
    if not picks:
        yield LogLine("no blind A/B picks yet (Compare tab): the report cannot say what you prefer")
    person_profile = {
        "style_distance": ev.mean_interval(
            [style_distance([d["output"]], person_texts) for d in held]
        ),
        "length_words": ev.mean_interval(person_len),
    }
    mean_len = sum(person_len) / len(person_len)
    sd_len = spread_of(person_texts)["length_words"]
    hacking = ev.reward_hacking_candidates(
        samples,
        judgements,
        picks,
        (mean_len, sd_len),
        [m.name for m in methods if m.kind == "checkpoint"],
    )

    # -- write ----------------------------------------------------------------------------------
    data = {
        "version": ev.VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "backend": ctx.backend,
        "policy_model": ctx.model("policy"),
        "holdout": {
            "n": len(held),
            "indices": sorted(split.holdout_index),
            "inputs": [d["input"] for d in held],
        },
        "train_demos": len(train),
        "samples_per_request": k,
        "rubric_sha": hashlib.sha256(rubric.encode()).hexdigest()[:12],
        "rubric": rubric,
        "methods": [m.describe() for m in methods],
        "metrics": metrics,
        "person": person_profile,
        "judge": judge_info,
        "judge_matrix": matrix,
        "dev_win_rates": dev_rates,
        "human": human,
        "reward_hacking_candidates": hacking,
        "wall_seconds": None,
        "files": {"samples": ev.SAMPLES_FILE, "judgements": ev.JUDGEMENTS_FILE},
    }
    data["paired"] = paired_comparisons(  # vs base and few-shot, on the same requests
        per_demo_tables([*samples, *nll_rows], judgements), names, seed=cfg.seed
    )
    ev.write_jsonl(ws.result(ev.SAMPLES_FILE), [*samples, *dev_samples, *nll_rows])
    ev.write_jsonl(ws.result(ev.JUDGEMENTS_FILE), judgements)
    data["wall_seconds"] = time.time() - t_start
    path = ev.write_evaluation(ws.results_dir, data)
    ev.write_evaluation(ctx.run_dir, data)  # the run keeps its own copy (rubric history)
    yield LogLine(
        f"wrote {ws.rel(path)}, {ev.SAMPLES_FILE} ({len(samples)} samples), {ev.JUDGEMENTS_FILE}"
    )

    from engine.eval.report import write_report

    written = await asyncio.to_thread(write_report, ws, data)
    yield LogLine(f"wrote {', '.join(ws.rel(p) for p in written)}")
    best = min(
        (m for m in names if metrics[m]["nll"]["mean"] is not None),
        key=lambda m: metrics[m]["nll"]["mean"],
        default=None,
    )
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(ws.result(OUTPUT)), ws.rel(path)),
        summary=f"{len(methods)} methods on {len(held)} held-out requests"
        + (f"; lowest NLL: {ev.method_label(best)}" if best else "")
        + (f"; not evaluated this time: {', '.join(dropped)}" if dropped else ""),
    )


def _data_needed(ctx: StageContext, m: Method, n_train: int) -> str:
    if m.kind == "base":
        return "nothing"
    if m.kind == "prompt":
        return "a system prompt"
    if m.kind == "few-shot":
        return f"{len(m.examples)} demonstrations in context"
    ws = ctx.workspace
    if m.name == "sft":
        rows = ev.read_rows(ws.result(RESULT_FILES["synth-outputs"]))
        kept = [r for r in rows if r.get("status") != "rejected"]
        return f"{len(kept)} synthetic pairs (teacher-written from {n_train} demonstrations)"
    if m.name == "rlaif":
        return f"{len(ev.read_rows(ws.result(RESULT_FILES['rl-prompts'])))} synthetic prompts + a judge"
    if m.name in ("ditto", "sft-demos"):
        return f"{n_train} demonstrations"
    return "see its run"
