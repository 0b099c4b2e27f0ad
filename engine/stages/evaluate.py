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
   the rubric, both orders (calibrated: engine.judge); and each method against the base on
   the RL dev prompts (results/rl_dev_data.jsonl) without a reference; then the judge's
   accuracy: the person's held-out text against the base and few-shot samples, no reference
   (it should prefer the person's), with plain warnings when it decided (almost) nothing or
   cannot tell them apart;
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

from engine.eval import evaluation as ev
from engine.eval.judge_trust import judge_warnings, person_accuracy
from engine.eval.metrics.likelihood import target_nlls
from engine.eval.metrics.stylometry import (
    spread_of,
    style_distance,
    style_distance_by_feature,
    text_profile,
)
from engine.eval.paired import paired_comparisons, per_demo_tables
from engine.llm.judge import Comparison, Judge
from engine.llm.sampling import Sampler, as_completed_tasks, open_sampler
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


def dev_turns(row: dict[str, Any]) -> Messages | None:
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


@dataclass
class _State:
    """What the phases of one evaluation share; each phase reads what earlier ones left."""

    ctx: StageContext
    t_start: float
    split: Any
    demo_index: list[int]
    system_prompt: str
    rubric: str
    methods: list[Method] = field(default_factory=list)
    judge: Judge | None = None
    judge_info: dict[str, Any] = field(default_factory=lambda: {"used": False})
    sem: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    nll_rows: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[tuple[str, int], list[tuple[str, int]]] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    dev_samples: list[dict[str, Any]] = field(default_factory=list)
    judgements: list[dict[str, Any]] = field(default_factory=list)
    dev_rates: dict[str, Any] = field(default_factory=dict)
    matrix: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # methods of the last evaluation not run

    @property
    def cfg(self) -> Any:
        return self.ctx.config.evaluate

    @property
    def train(self) -> list[dict[str, str]]:
        return self.split.train

    @property
    def held(self) -> list[dict[str, str]]:
        return self.split.holdout

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    @property
    def person_texts(self) -> list[str]:
        return [d["output"] for d in self.train]

    async def sample(self, m: Method, turns: Messages, n: int, seed: int) -> list[tuple[str, int]]:
        """``n`` samples of method ``m`` on a request, each with its token count."""
        sampling = self.ctx.config.sampling
        async with self.sem:
            self.ctx.check_cancel()
            return await m.sampler.generate_counted(
                m.context(turns),
                max_tokens=self.cfg.max_tokens,
                temperature=self.cfg.temperature,
                top_p=sampling.top_p,
                seed=seed,
                num_samples=n,
                trim_repeats=sampling.trim_repeats,
            )


def _start(ctx: StageContext) -> _State:
    split = ctx.split()
    if not split.holdout:
        raise StageError(
            (split.warning or "No demonstration is held out.")
            + ". Nothing can be evaluated fairly: every demonstration is training data. "
            "Add demonstrations in the Demonstrations tab (with 5 or more one is held out, "
            "with 8 or more two), or set data.holdout, then rerun the trained stages and evaluate."
        )
    ws = ctx.workspace
    all_inputs = [d["input"] for d in ws.load_demos()]
    prompts = ws.load_prompts()
    return _State(
        ctx=ctx,
        t_start=time.time(),
        split=split,
        demo_index=[all_inputs.index(d["input"]) for d in split.holdout],
        system_prompt=str(prompts.get("system_prompt", "")).strip(),
        rubric=str(prompts.get("rubric", "")).strip(),
        sem=asyncio.Semaphore(ctx.config.evaluate.concurrency),
    )


async def run(ctx: StageContext) -> AsyncIterator[Event]:
    st = _start(ctx)
    yield LogLine(
        f"{len(st.held)} held-out requests (demonstrations {[i + 1 for i in st.demo_index]}), "
        f"{len(st.train)} training demonstrations"
    )
    phases = (
        _methods_phase,
        _open_judge_phase,
        _likelihood_phase,
        _samples_phase,
        _embedding_phase,
        _style_phase,
        _judge_phase,
        _write_phase,
    )
    for phase in phases:
        async with aclosing(phase(st)) as events:
            async for event in events:
                yield event


async def _checkpoint_method(
    st: _State, name: str, entry: dict[str, Any], holdout_fp: str
) -> AsyncIterator[Event | Method]:
    """The method for one registry entry (yielded last), or warnings saying why it is skipped."""
    ctx = st.ctx
    last = entry.get("last_finished")
    if entry.get("finished") is False and isinstance(last, dict) and last.get("sampler_path"):
        # a retrain is under way (or failed): the stage's results are still the finished run's
        yield LogLine(
            f"{name}: its latest run is unfinished (step {entry.get('step')}, "
            f"{entry.get('run')}): measuring the last finished run ({last.get('run')}, "
            f"step {last.get('step')}); rerun {name} to finish the new one",
            "warning",
        )
        entry = last
    base_model = entry.get("base_model") or ctx.model("policy")
    if base_model != ctx.model("policy"):
        yield LogLine(
            f"{name}: trained on {base_model}, not the policy {ctx.model('policy')}: skipped",
            "warning",
        )
        return
    if entry.get("backend") not in (None, ctx.backend):
        yield LogLine(f"{name}: trained on backend {entry['backend']}: skipped", "warning")
        return
    if entry.get("finished") is False:
        yield LogLine(f"{name}: its run did not finish; evaluating its last checkpoint", "warning")
    try:
        sampler = await open_sampler(ctx, role="policy", model_path=str(entry["sampler_path"]))
    except (FileNotFoundError, ValueError) as e:
        yield LogLine(f"{name}: cannot open {entry['sampler_path']} ({e}): skipped", "warning")
        return
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
    yield Method(
        name,
        "checkpoint",
        sampler,
        system_prompt=st.system_prompt if use_system else None,
        entry=entry,
        split_changed=changed,
    )


async def _methods_phase(st: _State) -> AsyncIterator[Event]:
    """baseline, prompting, few-shot, then every policy checkpoint in the registry."""
    ctx, cfg = st.ctx, st.cfg
    base = await open_sampler(ctx, role="policy")
    few = st.train[: cfg.few_shot_examples] if cfg.few_shot_examples else st.train
    methods = [Method("baseline", "base", base)]
    if st.system_prompt:
        methods.append(Method("prompting", "prompt", base, system_prompt=st.system_prompt))
    else:
        yield LogLine(
            "no system prompt in data/prompts.toml: skipping the prompted method", "warning"
        )
    methods.append(Method("few-shot", "few-shot", base, examples=few))
    holdout_fp = split_fingerprint(st.split)
    for name, entry in read_registry(ctx.workspace.results_dir, strict=True).items():
        if name in NOT_POLICIES or not isinstance(entry, dict) or not entry.get("sampler_path"):
            continue
        if cfg.methods and name not in cfg.methods:
            continue
        async for item in _checkpoint_method(st, name, entry, holdout_fp):
            if isinstance(item, Method):
                methods.append(item)
            else:
                yield item
    if cfg.methods:
        unknown = [m for m in cfg.methods if m not in {x.name for x in methods}]
        methods = [m for m in methods if m.name in cfg.methods]
        if unknown:
            yield LogLine(f"evaluate.methods: no results for {', '.join(unknown)}", "warning")
        if not methods:
            raise StageError(f"evaluate.methods = {list(cfg.methods)}: none of them has results.")
    st.methods = methods
    yield LogLine(f"methods: {', '.join(st.names)}")
    st.dropped = results.methods_dropped(ctx.workspace.results_dir, st.names)
    if st.dropped:  # never a narrower result over a wider one without saying so
        yield LogLine(results.narrower_warning(st.dropped), "warning")


async def _open_judge_phase(st: _State) -> AsyncIterator[Event]:
    """The judge, opened before any sampling: a bad judge fails now, not after it."""
    ctx, cfg = st.ctx, st.cfg
    if not (cfg.judge and len(st.methods) >= 2 and st.rubric):
        return
    try:
        judge, what = await open_judge(ctx, concurrency=cfg.concurrency)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(
            f"cannot open the judge ({e}): rerun the reward-model stage, or set "
            "reward_model.train = false there to use the base judge, or evaluate.judge = false"
        ) from e
    st.judge = judge
    st.judge_info = {
        "used": False,
        "model": ctx.model("judge"),
        "checkpoint": judge_checkpoint(judge),
        "mode": judge.mode,
    }
    yield LogLine(f"judge: {what}")


async def _likelihood_phase(st: _State) -> AsyncIterator[Event]:
    """NLL of the person's held-out texts under each method, in its own context."""
    methods, held = st.methods, st.held
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
    for m, per in zip(methods, nlls, strict=True):
        st.metrics[m.name] = {"nll": ev.nll_summary(per)}
        if st.metrics[m.name]["nll"]["mean"] is not None:
            yield Metric(f"eval/nll/{m.name}", 0, st.metrics[m.name]["nll"]["mean"])
        for r, x in enumerate(per):
            st.nll_rows.append(
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
    st.ctx.check_cancel()
    yield Progress(len(methods), len(methods), "evaluate: likelihood")


async def _samples_phase(st: _State) -> AsyncIterator[Event]:
    """``evaluate.samples`` samples of every method on every held-out request."""
    cfg, held = st.cfg, st.held
    jobs: list[tuple[Method, int]] = [(m, r) for m in st.methods for r in range(len(held))]
    t0 = time.time()
    total = len(jobs)
    yield Progress(0, total, "evaluate: sampling")

    async def job(m: Method, r: int) -> tuple[Method, int, list[tuple[str, int]]]:
        out = await st.sample(m, _user(held[r]["input"]), cfg.samples, cfg.seed + r)
        st.finished_at[m.name] = time.time() - t0
        return m, r, out

    done = 0
    async with aclosing(as_completed_tasks(job(m, r) for m, r in jobs)) as stream:
        async for m, r, out in stream:
            st.outputs[(m.name, r)] = out
            done += 1
            for text, _n in out[:1]:
                yield SampleProduced(input=held[r]["input"], output=text, source=m.name)
            yield Progress(done, total, "evaluate: sampling")
            st.ctx.check_cancel()

    person_texts = st.person_texts
    for m in st.methods:
        for r, d in enumerate(held):
            for s, (text, ntok) in enumerate(st.outputs[(m.name, r)]):
                st.samples.append(
                    {
                        "kind": "sample",
                        "id": f"{m.name}/r{r}/s{s}",
                        "method": m.name,
                        "request": r,
                        "demo_index": st.demo_index[r],
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
    empty = sum(1 for s in st.samples if not s["output"].strip())
    if empty:
        yield LogLine(
            f"{empty} of {len(st.samples)} samples are empty (the model stopped at once)",
            "warning",
        )


async def _embedding_phase(st: _State) -> AsyncIterator[Event]:
    """MiniLM similarity of each sample to the person's text and to their centroid."""
    if st.cfg.embedding:
        try:
            from engine.eval.metrics import embedding

            texts = [s["output"] for s in st.samples]
            paired = await _off_loop(
                st.ctx,
                functools.partial(
                    embedding.paired_similarity, texts, [s["person_output"] for s in st.samples]
                ),
            )
            centre = await _off_loop(
                st.ctx, functools.partial(embedding.centroid_similarity, texts, st.person_texts)
            )
            for s, p, c in zip(st.samples, paired, centre, strict=True):
                s["similarity"], s["centroid_similarity"] = p, c
        except Exception as e:  # a missing package must not cost the rest of the evaluation
            yield LogLine(f"embedding similarity skipped: {e}", "warning")
    st.ctx.check_cancel()


async def _style_phase(st: _State) -> AsyncIterator[Event]:
    """Per method: style distance, similarities, length and cost."""
    person_texts = st.person_texts
    for m in st.methods:
        mine = [s for s in st.samples if s["method"] == m.name]
        texts = [s["output"] for s in mine if s["output"].strip()]
        met = st.metrics[m.name]
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
        ws = st.ctx.workspace
        met["cost"] = {
            "samples": len(mine),
            "sampled_tokens": sum(s["tokens"] for s in mine),
            "sampling_seconds": st.finished_at.get(m.name),
            "training": ev.training_cost(ws.root / m.entry["run"] if m.entry.get("run") else None),
            "data": _data_needed(st.ctx, m, len(st.train)),
        }
        for key in ("style_distance", "embedding_similarity"):
            if met[key]["mean"] is not None:
                yield Metric(f"eval/{key}/{m.name}", 0, met[key]["mean"])


def _heldout_comparisons(st: _State) -> tuple[list[Comparison], list[tuple[Any, ...]]]:
    """Every pair of methods, sample i against sample i, the person's text as reference."""
    comps, meta = [], []
    for i, a in enumerate(st.methods):
        for b in st.methods[i + 1 :]:
            for r, d in enumerate(st.held):
                out_a, out_b = st.outputs[(a.name, r)], st.outputs[(b.name, r)]
                for s in range(min(len(out_a), len(out_b))):
                    comps.append(
                        Comparison(
                            _user(d["input"]), out_a[s][0], out_b[s][0], st.rubric,
                            reference=d["output"],
                        )
                    )  # fmt: skip
                    meta.append(("heldout", a.name, b.name, r, s, d["input"]))
    return comps, meta


async def _dev_phase(
    st: _State, comps: list[Comparison], meta: list[tuple[Any, ...]]
) -> AsyncIterator[Event]:
    """One sample of each method on the RL dev prompts, each compared with the base's."""
    cfg, ws = st.cfg, st.ctx.workspace
    dev_rows = ev.read_rows(ws.result(ev.DEV_FILE))[: cfg.dev_prompts] if cfg.dev_prompts else []
    turns = [t for t in (dev_turns(x) for x in dev_rows) if t]
    if not (turns and "baseline" in st.names):
        if cfg.dev_prompts and not turns:
            yield LogLine(f"no {ev.DEV_FILE} (run rl-prompts): no dev win rates", "info")
        return
    total = len(turns) * len(st.methods)
    yield Progress(0, total, "evaluate: dev samples")

    async def job(m: Method, j: int) -> tuple[str, int, tuple[str, int]]:
        out = await st.sample(m, turns[j], 1, cfg.seed + 10_000 + j)
        return m.name, j, out[0]

    by: dict[tuple[str, int], tuple[str, int]] = {}
    jobs = [job(m, j) for m in st.methods for j in range(len(turns))]
    async with aclosing(as_completed_tasks(jobs)) as stream:
        async for mname, j, out in stream:
            by[(mname, j)] = out
            yield Progress(len(by), total, "evaluate: dev samples")
            st.ctx.check_cancel()
    for m in st.methods:  # in method order, as before
        for j in range(len(turns)):
            text, ntok = by[(m.name, j)]
            st.dev_samples.append(
                {
                    "kind": "dev_sample",
                    "id": f"{m.name}/dev{j}",
                    "method": m.name,
                    "request": j,
                    "input": turns[j][-1]["content"],
                    "output": text,
                    "tokens": ntok,
                }
            )
    for m in st.methods:
        if m.name == "baseline":
            continue
        for j, t in enumerate(turns):
            comps.append(Comparison(t, by[(m.name, j)][0], by[("baseline", j)][0], st.rubric))
            meta.append(("dev", m.name, "baseline", j, 0, t[-1]["content"]))


async def _judge_phase(st: _State) -> AsyncIterator[Event]:
    """The judge on every pair of methods (held-out) and each method against the base (dev)."""
    judge = st.judge
    if judge is None:
        cfg = st.cfg
        why = (
            "evaluate.judge = false"
            if not cfg.judge
            else "no rubric in data/prompts.toml"
            if not st.rubric
            else "one method"
        )
        yield LogLine(f"judge skipped ({why})", "warning")
        st.matrix = ev.judge_matrix([], st.names)
    else:
        comps, meta = _heldout_comparisons(st)
        async with aclosing(_dev_phase(st, comps, meta)) as events:
            async for event in events:
                yield event
        yield Progress(0, len(comps), "evaluate: judging")
        records: list[Any] = []
        for start in range(0, len(comps), JUDGE_CHUNK):
            st.ctx.check_cancel()
            records += await judge.judge(comps[start : start + JUDGE_CHUNK])
            yield Progress(len(records), len(comps), "evaluate: judging")
        for (kind, a, b, r, s, text), rec in zip(meta, records, strict=True):
            ida, idb = (
                (f"{a}/r{r}/s{s}", f"{b}/r{r}/s{s}")
                if kind == "heldout"
                else (f"{a}/dev{r}", f"{b}/dev{r}")
            )
            st.judgements.append(
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
        st.judge_info["stats"] = judge.stats.as_dict()
        st.judge_info["used"] = True
        async with aclosing(_accuracy_phase(st)) as events:
            async for event in events:
                yield event
        async with aclosing(_judge_metrics(st)) as events:
            async for event in events:
                yield event
    wins = ev.judge_wins_per_sample([j for j in st.judgements if j["set"] == "heldout"])
    for s in st.samples:
        s["judge"] = wins.get(s["id"], [0, 0, 0])


async def _accuracy_phase(st: _State) -> AsyncIterator[Event]:
    """Whether the judge can tell the person's held-out text from the base and few-shot
    samples for the same request (it should prefer the person's), and why not to trust it."""
    assert st.judge is not None
    cases: dict[str, list[tuple[Messages, str, str]]] = {"vs_base": [], "vs_few_shot": []}
    for key, method in (("vs_base", "baseline"), ("vs_few_shot", "few-shot")):
        for r, d in enumerate(st.held):
            for text, _n in st.outputs.get((method, r), []):
                if text.strip() and text.strip() != d["output"].strip():
                    cases[key].append((_user(d["input"]), d["output"], text))
    n = sum(len(v) for v in cases.values())
    yield Progress(0, n, "evaluate: judge accuracy")
    accuracy, stats = await person_accuracy(st.judge, cases, st.rubric)
    yield Progress(n, n, "evaluate: judge accuracy")
    st.judge_info["accuracy"] = accuracy
    st.judge_info["accuracy_stats"] = stats
    for key, cell in accuracy.items():
        yield Metric(f"eval/judge_accuracy/{key}", 0, cell["value"])
    st.judge_info["warnings"] = judge_warnings(st.judge_info["stats"], accuracy)
    for line in st.judge_info["warnings"]:
        yield LogLine(line, "warning")


async def _judge_metrics(st: _State) -> AsyncIterator[Event]:
    """Win rates per method (held-out against all, dev against the base) and the matrix."""
    held_recs = [
        (j["method_a"], j["method_b"], j["preference"])
        for j in st.judgements
        if j["set"] == "heldout"
    ]
    for m in st.methods:
        wr = ev.overall_record(held_recs, m.name)
        st.metrics[m.name]["judge_vs_all"] = wr.as_dict()
        if wr.n:
            yield Metric(f"eval/judge_win_rate/{m.name}", 0, wr.rate or 0.0)
        dev = [
            (j["method_a"], j["method_b"], j["preference"])
            for j in st.judgements
            if j["set"] == "dev" and j["method_a"] == m.name
        ]
        if dev:
            dwr = ev.overall_record(dev, m.name)
            st.dev_rates[m.name] = dwr.as_dict()
            st.metrics[m.name]["dev_vs_baseline"] = dwr.as_dict()
    st.matrix = ev.judge_matrix(held_recs, st.names)


def _human_and_person(st: _State) -> tuple[list[Any], dict[str, Any], dict[str, Any], Any]:
    """The person's blind picks, their own profile, and reward-hacking candidates."""
    ws = st.ctx.workspace
    held_judgements = [j for j in st.judgements if j["set"] == "heldout"]
    picks = ev.read_preferences(ws.results_dir)
    human = ev.human_summary(picks, held_judgements, st.names)
    person_texts = st.person_texts
    person_len = [text_profile(t)["length_words"] for t in person_texts]
    person_profile = {
        "style_distance": ev.mean_interval(
            [style_distance([d["output"]], person_texts) for d in st.held]
        ),
        "length_words": ev.mean_interval(person_len),
    }
    mean_len = sum(person_len) / len(person_len)
    sd_len = spread_of(person_texts)["length_words"]
    hacking = ev.reward_hacking_candidates(
        st.samples,
        st.judgements,
        picks,
        (mean_len, sd_len),
        [m.name for m in st.methods if m.kind == "checkpoint"],
    )
    return picks, human, person_profile, hacking


async def _write_phase(st: _State) -> AsyncIterator[Event]:
    """evaluation.json, the samples and judgements files, then the report."""
    ctx, ws, held = st.ctx, st.ctx.workspace, st.held
    for problem in results.preference_problems(ws.results_dir):
        yield LogLine(problem, "warning")
    picks, human, person_profile, hacking = _human_and_person(st)
    if not picks:
        yield LogLine("no blind A/B picks yet (Compare tab): the report cannot say what you prefer")
    data = {
        "version": ev.VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "backend": ctx.backend,
        "policy_model": ctx.model("policy"),
        "holdout": {
            "n": len(held),
            "indices": sorted(st.split.holdout_index),
            "inputs": [d["input"] for d in held],
        },
        "train_demos": len(st.train),
        "samples_per_request": st.cfg.samples,
        "rubric_sha": hashlib.sha256(st.rubric.encode()).hexdigest()[:12],
        "rubric": st.rubric,
        "methods": [m.describe() for m in st.methods],
        "metrics": st.metrics,
        "person": person_profile,
        "judge": st.judge_info,
        "judge_matrix": st.matrix,
        "dev_win_rates": st.dev_rates,
        "human": human,
        "reward_hacking_candidates": hacking,
        "wall_seconds": None,
        "files": {"samples": ev.SAMPLES_FILE, "judgements": ev.JUDGEMENTS_FILE},
    }
    data["paired"] = paired_comparisons(  # vs base and few-shot, on the same requests
        per_demo_tables([*st.samples, *st.nll_rows], st.judgements), st.names, seed=st.cfg.seed
    )
    ev.write_jsonl(ws.result(ev.SAMPLES_FILE), [*st.samples, *st.dev_samples, *st.nll_rows])
    ev.write_jsonl(ws.result(ev.JUDGEMENTS_FILE), st.judgements)
    data["wall_seconds"] = time.time() - st.t_start
    path = ev.write_evaluation(ws.results_dir, data)
    ev.write_evaluation(ctx.run_dir, data)  # the run keeps its own copy (rubric history)
    yield LogLine(
        f"wrote {ws.rel(path)}, {ev.SAMPLES_FILE} ({len(st.samples)} samples), {ev.JUDGEMENTS_FILE}"
    )

    from engine.eval.report import write_report

    written = await asyncio.to_thread(write_report, ws, data)
    yield LogLine(f"wrote {', '.join(ws.rel(p) for p in written)}")
    best = min(
        (m for m in st.names if st.metrics[m]["nll"]["mean"] is not None),
        key=lambda m: st.metrics[m]["nll"]["mean"],
        default=None,
    )
    yield StageFinished(
        stage=ctx.stage,
        outputs=(ws.rel(ws.result(OUTPUT)), ws.rel(path)),
        summary=f"{len(st.methods)} methods on {len(held)} held-out requests"
        + (f"; lowest NLL: {ev.method_label(best)}" if best else "")
        + (f"; not evaluated this time: {', '.join(st.dropped)}" if st.dropped else ""),
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
