"""Stage 7: train the rubric-grounded pairwise judge, then check it against the person.

Training data (any mix):
  - the person's own pairs (``reward_model.own_pairs``), built offline: for each TRAINING
    demonstration (ctx.split().train; held-out ones never), the person's text preferred over
    every stage's sample for the same request (baseline, prompting, sft, ditto: OWN_SOURCES),
    with the rubric of data/prompts.toml, in both orders;
  - a Preference-Collection file (``reward_model.dataset``, parquet or jsonl; see
    engine.llm.preference_data), ``max_examples`` rows, its first ``heldout_examples`` kept aside.

LoRA SFT of the judge model (models.judge) on its target text: ``[RESULT] X`` in verdict
mode, ``feedback [RESULT] X`` in feedback mode (``reward_model.mode``; auto = verdict on local,
feedback on Tinker). Same runs/checkpoints/resume machinery as sft; the checkpoint is recorded
as [reward-model] in results/checkpoints.toml (with the judge mode). A finished training of
the same data is reused, so a rerun after a kill during validation only validates.
``reward_model.train = false`` uses the base judge as is, and records ``use_base = true`` in
[reward-model] so rlaif and evaluate use the base judge too (a later trained run clears it).

Live metrics: train/loss, rm/heldout_accuracy, rm/position_consistency, rm/unparsable_rate
(held-out: the dataset's held-out rows and the own pairs of a few training demonstrations).

Accuracy (:func:`accuracy_block`, engine.judge_accuracy): the base and the trained judge on
the person's held-out texts against base and few-shot samples for the same requests, and on
the pairs it trained on ("seen in training"), with Wilson intervals -> the summary's
``accuracy`` block, with plain ``warnings`` when the judge cannot be trusted.

Validation (:func:`validate_rubric`, also for the TUI): the judge compares baseline vs SFT
outputs on every demonstration request with the current rubric, both orders ->
results/rm_validation.json ({"summary", "records"}; records in the seed's shape, preference 1 =
baseline preferred, -1 = SFT) and a summary: wins each side, ties, unparsable, position
consistency, agreement with the person's blind picks (results/human_preferences.jsonl).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tinker

from engine.eval.judge_trust import accuracy_lines, judge_warnings, person_accuracy
from engine.llm.judge import (
    PREFER_A,
    PREFER_B,
    TIE,
    Comparison,
    Judge,
    JudgeStats,
    training_messages,
)
from engine.llm.judge_accuracy import Case, heldout_cases
from engine.llm.preference_data import JudgeExample, load_preference_collection
from engine.llm.sampling import Sampler, resolve
from engine.run.context import StageContext, StageError
from engine.run.events import Event, LogLine, Metric, StageFinished
from engine.run.supervised import batch_indices, supervised_step
from engine.run.train_run import TrainRun, adam, digest, section_settings
from engine.store.checkpoints import latest_checkpoint, record_checkpoint, registry_path
from engine.store.results import (
    JUDGE_ACCURACY_FILE,
    RESULT_FILES,
    RM_VALIDATION_FILE,
    preference_problems,
    read_method_outputs,
    read_preferences,
    read_rm_validation,
    write_rm_validation,
)
from engine.store.split import split_fingerprint

OUTPUT = RM_VALIDATION_FILE
STAGE = "reward-model"
# Every stage that samples the policy on the demonstrations: the judge trains on the person's
# text preferred over each of them (for the training demonstrations only).
OWN_SOURCES = ("baseline", "prompting", "sft", "ditto")


def judge_mode(ctx: StageContext) -> str:
    return mode_on(ctx.config.reward_model.mode, ctx.backend)


def mode_on(mode: str, backend: str) -> str:
    """The judge mode a setting means on a backend: auto is feedback on Tinker, else verdict."""
    if mode == "auto":
        return "feedback" if backend == "tinker" else "verdict"
    return mode


def _key(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- own pairs


def build_own_pairs(
    train_demos: Sequence[Mapping[str, str]],
    method_rows: Mapping[str, Sequence[Mapping[str, Any]]],
    rubric: str,
) -> list[JudgeExample]:
    """The person's text preferred over each method's sample for the same request, both orders.

    Only ``train_demos`` are used (pass ``ctx.split().train``): a method's rows for any other
    request (the held-out demonstrations' included) are ignored.
    """
    by_source = {
        src: {_key(r.get("input", "")): str(r.get("output", "")) for r in rows}
        for src, rows in method_rows.items()
    }
    out: list[JudgeExample] = []
    for d in train_demos:
        mine = str(d["output"])
        for src, outputs in by_source.items():
            other = outputs.get(_key(d["input"]), "")
            if not other.strip() or _key(other) == _key(mine):
                continue
            c = Comparison(
                prompt_conversation=[{"role": "user", "content": d["input"]}],
                completion_a=mine,
                completion_b=other,
                rubric=rubric,
            )
            group = f"demo:{_key(d['input'])}"
            out.append(JudgeExample(c, PREFER_A, None, f"own-{src}", group))
            out.append(JudgeExample(c.swap(), PREFER_B, None, f"own-{src}", group))
    return out


def split_own_pairs(
    examples: list[JudgeExample], seed: int
) -> tuple[list[JudgeExample], list[JudgeExample]]:
    """Hold out the own pairs of about a fifth of the demonstrations (at least one when there
    are three or more) for the accuracy metric; keep the rest for training."""
    groups = sorted({e.group for e in examples})
    if len(groups) < 3:
        return examples, []
    random.Random(seed).shuffle(groups)
    held = set(groups[: max(1, round(len(groups) / 5))])
    return [e for e in examples if e.group not in held], [e for e in examples if e.group in held]


def canonical_examples(examples: Sequence[JudgeExample]) -> list[JudgeExample]:
    """One orientation per comparison (the other is judged by the both-orders judge)."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for e in examples:
        c = e.comparison
        key = (repr(c.prompt_conversation), *sorted((c.completion_a, c.completion_b)))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


# --------------------------------------------------------------------------- judges


def trained_judge_entry(ctx: StageContext) -> dict[str, Any] | None:
    """The trained judge to use, or None for the base judge (none trained for this judge model
    and backend, or the last reward-model run said ``reward_model.train = false``: use_base)."""
    entry = latest_checkpoint(ctx.workspace.results_dir, STAGE)
    if (
        entry
        and not entry.get("use_base")
        and entry.get("finished")
        and entry.get("sampler_path")
        and entry.get("base_model") == ctx.model("judge")
        and entry.get("backend", ctx.backend) == ctx.backend
    ):
        return entry
    return None


async def open_judge(
    ctx: StageContext, *, concurrency: int = 64, use_trained: bool = True
) -> tuple[Judge, str]:
    """The reward-model judge: the trained checkpoint of [reward-model] in
    results/checkpoints.toml when there is one for this judge model and backend (and the last
    reward-model run did not choose the base judge, ``use_base``), else the base judge model.
    Returns (judge, a description for logs); ``judge_checkpoint(judge)`` is the checkpoint used."""
    from engine.backends.renderers import get_renderer_for

    model = ctx.model("judge")
    svc = ctx.service_client()
    entry = trained_judge_entry(ctx) if use_trained else None
    if entry:
        client = await resolve(
            svc.create_sampling_client(model_path=entry["sampler_path"], base_model=model)
        )
        mode = entry.get("mode") or judge_mode(ctx)
        what = f"trained judge {entry['sampler_path']} ({mode} mode)"
    else:
        client = await resolve(svc.create_sampling_client(base_model=model))
        mode = judge_mode(ctx)
        what = f"base judge {model} ({mode} mode)"
    tok = client.get_tokenizer()
    sampler = Sampler(
        client=client, renderer=get_renderer_for(model, tok), tokenizer=tok, model=model
    )
    judge = Judge(sampler, mode=mode, concurrency=concurrency, **combine_settings(ctx))
    judge.checkpoint = entry["sampler_path"] if entry else None  # type: ignore[attr-defined]
    return judge, what


def combine_settings(ctx: StageContext) -> dict[str, Any]:
    """How every judge of this workspace turns both orders into a verdict."""
    cfg = ctx.config.reward_model
    return {"combine": cfg.combine, "tie_margin": cfg.tie_margin}


def judge_checkpoint(judge: Any) -> str | None:
    """The trained checkpoint a judge from :func:`open_judge` uses (None: the base model)."""
    return getattr(judge, "checkpoint", None)


async def heldout_metrics(judge: Any, examples: Sequence[JudgeExample]) -> dict[str, float]:
    """Verdict accuracy (each answer, both orders), position consistency, unparsable rate."""
    canon = canonical_examples(examples)
    if not canon:
        return {}
    old = judge.reset_stats()
    try:
        records = await judge.judge([e.comparison for e in canon])
        stats = judge.stats
    finally:
        judge.stats = old
    correct = answers = 0
    for e, r in zip(canon, records, strict=True):
        answers += 1
        correct += int(r.verdict_ab.preference == e.preference)
        if r.verdict_ba is not None:
            answers += 1
            correct += int(r.verdict_ba.preference == -e.preference)
    out = {"accuracy": correct / answers, "unparsable_rate": stats.unparsable_rate}
    if stats.consistency_rate is not None:
        out["position_consistency"] = stats.consistency_rate
    return out


# --------------------------------------------------------------------------- validation


@dataclass
class RmValidation:
    """What :func:`validate_rubric` found: per-request records and the summary."""

    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The summary as a few log lines."""
        s = self.summary
        cons, bias = s.get("position_consistency"), s.get("mean_position_bias")
        decided = s.get("decided_share")
        out = [
            f"judge ({s.get('judge', '?')}) on {s.get('n', 0)} requests: baseline preferred "
            f"{s.get('baseline_wins', 0)}, SFT preferred {s.get('sft_wins', 0)}, ties "
            f"{s.get('ties', 0)}; decided {'n/a' if decided is None else f'{decided:.0%}'}; "
            f"mean position bias {'n/a' if bias is None else f'{bias:+.2f} nats'}; unparsable "
            f"answers {s.get('unparsable', 0)}; position consistency "
            f"{'n/a' if cons is None else f'{cons:.0%}'}"
        ]
        out += accuracy_lines(s.get("accuracy") or {})
        h = s.get("human", {})
        if h.get("count"):
            out.append(
                f"agreement with your blind picks: {h['agree']}/{h['count']} ({h['percent']:.0f}%)"
                + (
                    f"; disagree on: {'; '.join(x[:60] for x in h['disagree'])}"
                    if h["disagree"]
                    else ""
                )
            )
        else:
            out.append(h.get("note", "no blind picks yet"))
        return out + list(h.get("skipped", []))


def human_picks_baseline_vs_sft(results_dir: Any) -> dict[str, int]:
    """The person's latest blind pick per request between baseline and SFT, as a preference
    with baseline first (1 = baseline, -1 = SFT, 0 = tie)."""
    picks: dict[str, int] = {}
    for p in read_preferences(results_dir):
        if {p.get("a"), p.get("b")} != {"baseline", "sft"}:
            continue
        winner = p.get("winner")
        pref = PREFER_A if winner == "baseline" else PREFER_B if winner == "sft" else TIE
        picks[_key(p.get("input", ""))] = pref
    return picks


ValidationOutputs = tuple[dict[str, dict[str, dict[str, Any]]], list[str]]


def load_validation_outputs(ctx: StageContext) -> ValidationOutputs:
    """The baseline and SFT outputs validation compares, keyed by request, and the requests
    both have. Raises StageError when either file is missing, unreadable or empty, or they
    share no request: call it before loading a judge model, so a missing file fails at once."""
    ws = ctx.workspace
    loaded = {}
    for method, stage in (("baseline", "baseline"), ("sft", "sft")):
        path = ws.result(RESULT_FILES[stage])
        got = read_method_outputs(path)
        if got.error:
            raise StageError(got.error)
        if not got.rows:
            raise StageError(
                f"{ws.rel(path)} not found or empty: run `persona run {stage}` first "
                "(the judge is checked on baseline vs SFT outputs)."
            )
        loaded[method] = {_key(r["input"]): r for r in got.rows}
    inputs = [k for k in loaded["baseline"] if k in loaded["sft"]]
    if not inputs:
        raise StageError("baseline and SFT outputs share no request: rerun both stages.")
    return loaded, inputs


async def validate_rubric(
    ctx: StageContext,
    *,
    rubric: str | None = None,
    judge: Any = None,
    judge_name: str | None = None,
    write: bool = True,
    outputs: ValidationOutputs | None = None,
    accuracy: dict[str, Any] | None = None,
) -> RmValidation:
    """Judge baseline vs SFT outputs on every demonstration request with ``rubric`` (default:
    the one in data/prompts.toml), both orders; write results/rm_validation.json (``write``).

    ``judge`` defaults to :func:`open_judge` (the trained reward model, else the base judge).
    Needs results/baseline_results.json and results/sft_model_outputs.json (``outputs``: what
    :func:`load_validation_outputs` read, else read here before any judge is opened). For the
    TUI's Prompts & Rubric key: call it with the rubric being edited. ``accuracy``
    (:func:`accuracy_block`) goes into the summary with the warnings it gives.
    """
    ws = ctx.workspace
    if rubric is None:
        rubric = str(ws.load_prompts().get("rubric", "")).strip()
    if outputs is None:
        outputs = load_validation_outputs(ctx)
    loaded, inputs = outputs
    if judge is None:
        judge, judge_name = await open_judge(ctx, concurrency=ctx.config.reward_model.concurrency)
    comparisons = [
        Comparison(
            prompt_conversation=[{"role": "user", "content": loaded["baseline"][k]["input"]}],
            completion_a=loaded["baseline"][k]["output"],
            completion_b=loaded["sft"][k]["output"],
            rubric=rubric,
        )
        for k in inputs
    ]
    old = judge.reset_stats()
    try:
        results = await judge.judge(comparisons)
        stats: JudgeStats = judge.stats
    finally:
        judge.stats = old
    picks = human_picks_baseline_vs_sft(ws.results_dir)
    records = []
    agree, disagree = 0, []
    for k, c, r in zip(inputs, comparisons, results, strict=True):
        rec = {
            "input": loaded["baseline"][k]["input"],
            "baseline_output": c.completion_a,
            "sft_output": c.completion_b,
            "preference": r.preference,
            "grader_response": r.text_ab,
            "grader_response_swapped": r.text_ba,
            "verdicts": [str(r.verdict_ab), None if r.verdict_ba is None else str(r.verdict_ba)],
            "consistent": r.consistent,
            "human_pick": picks.get(k),
            **{x: r.as_dict()[x] for x in ("m_ab", "m_ba", "s", "b", "combined_by")},
        }
        records.append(rec)
        if k in picks:
            if picks[k] == r.preference:
                agree += 1
            else:
                disagree.append(rec["input"])
    n_picks = sum(1 for k in inputs if k in picks)
    human: dict[str, Any] = {"count": n_picks}
    skipped = preference_problems(ws.results_dir)
    if skipped:
        human["skipped"] = skipped
    if n_picks:
        human.update(agree=agree, percent=100.0 * agree / n_picks, disagree=disagree)
    else:
        human["note"] = (
            "No blind picks of baseline vs SFT yet: label some in the Compare tab (F5, blind "
            "A/B mode) to see whether the judge agrees with you."
        )
    summary = {
        "judge": judge_name or type(judge).__name__,
        "mode": getattr(judge, "mode", None),
        "rubric_sha": hashlib.sha256(rubric.encode()).hexdigest()[:12],
        "n": len(records),
        "baseline_wins": stats.wins_a,
        "sft_wins": stats.wins_b,
        "ties": stats.ties,
        "unparsable": stats.unparsable,
        "unparsable_rate": stats.unparsable_rate,
        "position_consistency": stats.consistency_rate,
        "decided_share": stats.decided_share,
        "mean_position_bias": stats.mean_position_bias,
        "combine": getattr(judge, "combine", None),
        "human": human,
    }
    if accuracy is not None:
        summary["accuracy"] = accuracy
        in_use = accuracy.get("trained") or accuracy.get("base") or {}
        summary["warnings"] = judge_warnings(stats.as_dict(), in_use)
    result = RmValidation(records, summary)
    if write:
        write_rm_validation(ws.result(OUTPUT), records, summary)
    return result


# --------------------------------------------------------------------------- judge accuracy


def seen_in_training_cases(ctx: StageContext, rubric: str) -> list[Case]:
    """The person's text against every stage's sample on the training demonstrations: the
    pairs the judge trains on (the person's text shown first; the judge swaps the order),
    less those :func:`split_own_pairs` keeps aside for the live held-out metric."""
    rows = {}
    for src in OWN_SOURCES:
        got = read_method_outputs(ctx.workspace.result(RESULT_FILES[src]))
        if got.rows:
            rows[src] = got.rows
    trained, _aside = split_own_pairs(
        build_own_pairs(ctx.split().train, rows, rubric), ctx.config.reward_model.seed
    )
    return [
        (list(e.comparison.prompt_conversation), e.comparison.completion_a,
         e.comparison.completion_b)
        for e in trained
        if e.preference == PREFER_A
    ]  # fmt: skip


async def accuracy_block(
    ctx: StageContext, judges: dict[str, Any], rubric: str
) -> tuple[dict[str, Any], list[str]]:
    """``{"base"|"trained": {"vs_base", "vs_few_shot", "seen_in_training": {value, n, ci},
    "position_bias_nats", "decided_share"}, "n_heldout_requests"}`` for each judge given, and
    log lines."""
    cases, sampled = await heldout_cases(ctx)
    seen = seen_in_training_cases(ctx, rubric)
    lines = [
        ("sampled" if sampled else "read")
        + f" {sum(len(v) for v in cases.values())} base and few-shot samples on the held-out "
        f"requests for the judge's accuracy ({JUDGE_ACCURACY_FILE})"
    ]
    out: dict[str, Any] = {"n_heldout_requests": len(ctx.split().holdout)}
    for name, judge in judges.items():
        t0 = time.perf_counter()
        cells, stats = await person_accuracy(judge, {**cases, "seen_in_training": seen}, rubric)
        n = stats["comparisons"]
        out[name] = {
            **cells,
            "position_bias_nats": stats["mean_position_bias"],
            "decided_share": stats["decided_share"],
            # what the agreement rule would have decided: the comparisons whose orders agree
            "decided_share_agreement": stats["consistent"] / n if n else None,
            "seconds_per_comparison": (time.perf_counter() - t0) / n if n else None,
        }
    lines += accuracy_lines(out)
    return out, lines


def known_warnings(ctx: StageContext, judge: Any) -> list[str]:
    """The warnings the last reward-model check (results/rm_validation.json) gave about this
    very judge (the same trained checkpoint, or the base judge): for stages that use it."""
    _records, summary = read_rm_validation(ctx.workspace.result(OUTPUT))
    checked = str(summary.get("judge", ""))
    ckpt = judge_checkpoint(judge)
    same = ckpt in checked if ckpt else checked.startswith("base judge")
    return [str(w) for w in summary.get("warnings") or []] if same else []


# --------------------------------------------------------------------------- the stage


def _gather_examples(
    ctx: StageContext,
) -> tuple[list[JudgeExample], list[JudgeExample], list[str]]:
    ws = ctx.workspace
    cfg = ctx.config.reward_model
    notes: list[str] = []
    train: list[JudgeExample] = []
    held: list[JudgeExample] = []
    if cfg.own_pairs:
        rubric = str(ws.load_prompts().get("rubric", "")).strip()
        rows = {}
        for src in OWN_SOURCES:
            got = read_method_outputs(ws.result(RESULT_FILES[src]))
            if got.rows:
                rows[src] = got.rows
            else:
                notes.append(f"no {RESULT_FILES[src]} (run `persona run {src}` for more pairs)")
        own = build_own_pairs(ctx.split().train, rows, rubric)
        own_train, own_held = split_own_pairs(own, cfg.seed)
        train += own_train
        held += own_held
        notes.append(f"{len(own)} own pairs ({len(own_held)} held out for accuracy)")
    if cfg.dataset:
        d_train, d_held = load_preference_collection(
            ws.setting_path(cfg.dataset),
            max_examples=cfg.max_examples,
            heldout=cfg.heldout_examples,
            seed=cfg.seed,
        )
        train += d_train
        held += d_held
        notes.append(f"{len(d_train)} Preference-Collection rows ({len(d_held)} held out)")
    return train, held, notes


async def run(ctx: StageContext) -> AsyncIterator[Event]:

    ws = ctx.workspace
    cfg = ctx.config.reward_model
    outputs: list[str] = []
    mode = judge_mode(ctx)
    model = ctx.model("judge")
    if cfg.validate_only:
        yield LogLine("reward_model.validate_only: checking the judge without training")
    elif cfg.train:
        train, held, notes = _gather_examples(ctx)
        for note in notes:
            yield LogLine(note)
        if not train:
            raise StageError(
                "No judge training data: run `persona run baseline` and `persona run prompting` "
                "(your own pairs), or point reward_model.dataset at a Preference-Collection file, "
                "or set reward_model.train = false to use the base judge."
            )
        convs = [training_messages(e.comparison, e.preference, e.feedback, mode) for e in train]
        async for ev in _train(ctx, convs, held, mode):
            yield ev
    else:
        # Recorded so later stages (rlaif, evaluate) use the base judge too, not an older
        # trained checkpoint; the entry's other fields stay (a rerun with train = true reuses
        # a finished training of the same data).
        record_checkpoint(ws.results_dir, STAGE, use_base=True)
        yield LogLine(f"reward_model.train = false: using the base judge {model} as is")
    outputs.append(ws.rel(registry_path(ws.results_dir)))
    summary = ["judge ready"]
    if cfg.validate or cfg.validate_only:
        async for ev in _validate(ctx, outputs, summary):
            yield ev
    yield StageFinished(stage=ctx.stage, outputs=tuple(outputs), summary=summary[-1])


async def _validate(
    ctx: StageContext, outputs: list[str], summary: list[str]
) -> AsyncIterator[Event]:
    """The judge's accuracy on held-out demonstrations (the base judge and the trained one),
    then baseline vs SFT with the rubric -> rm_validation.json; plain warnings when the judge
    decided (almost) nothing or cannot tell the person's writing from a model's. Appends the
    stage's summary line to ``summary`` and the file to ``outputs``. Without SFT outputs
    (outside validate_only) the accuracy is still measured and written."""
    cfg = ctx.config.reward_model
    ws = ctx.workspace
    rubric = cfg.rubric.strip() or str(ws.load_prompts().get("rubric", "")).strip()
    compared: ValidationOutputs | None = None
    try:
        # the outputs first: a missing file fails before a judge model is loaded
        compared = load_validation_outputs(ctx)
    except StageError as e:
        if cfg.validate_only:
            raise
        yield LogLine(f"baseline vs SFT validation skipped: {e}", "warning")
    judge, what = await open_judge(
        ctx, concurrency=cfg.concurrency, use_trained=cfg.train or cfg.validate_only
    )
    judges = {"trained" if judge_checkpoint(judge) else "base": judge}
    if judge_checkpoint(judge) and not cfg.validate_only:  # did training help?
        base, _ = await open_judge(ctx, concurrency=cfg.concurrency, use_trained=False)
        judges = {"base": base, **judges}
    yield LogLine(f"measuring the judge's accuracy on held-out demonstrations ({what})")
    accuracy, lines = await accuracy_block(ctx, judges, rubric)
    for line in lines:
        yield LogLine(line)
    for name, cells in accuracy.items():
        for key in ("vs_base", "vs_few_shot", "seen_in_training"):
            if isinstance(cells, dict) and key in cells:
                yield Metric(f"rm/accuracy/{name}/{key}", 0, cells[key]["value"])
    if compared is None:
        in_use = accuracy.get("trained") or accuracy.get("base") or {}
        s: dict[str, Any] = {"judge": what, "mode": judge.mode, "n": 0, "accuracy": accuracy}
        s["warnings"] = judge_warnings(None, in_use)
        write_rm_validation(ws.result(OUTPUT), [], s)
    else:
        yield LogLine(f"validating {what} on baseline vs SFT outputs")
        v = await validate_rubric(
            ctx, rubric=rubric, judge=judge, judge_name=what, outputs=compared, accuracy=accuracy
        )
        for line in v.lines():
            yield LogLine(line)
        s = v.summary
        if s["position_consistency"] is not None:
            yield Metric("rm/validation_consistency", 0, s["position_consistency"])
        summary.append(
            f"baseline {s['baseline_wins']} / SFT {s['sft_wins']} / ties {s['ties']} "
            f"on {s['n']} requests"
        )
    for line in s.get("warnings", []):
        yield LogLine(line, "warning")
    if s.get("warnings"):
        summary.append(summary[-1] + "; do not trust this judge (see the warnings)")
    outputs.insert(0, ws.rel(ws.result(OUTPUT)))


def train_run_for(ctx: StageContext, convs: list[list[dict[str, str]]], mode: str) -> TrainRun:
    """reward-model's lifecycle: its whole section, the comparisons, the judge model, its mode."""
    cfg = ctx.config.reward_model
    batch_size = min(cfg.batch_size, len(convs))
    model = ctx.model("judge")
    split = split_fingerprint(ctx.split())  # the own pairs came from the training demos
    return TrainRun(
        ctx,
        STAGE,
        section="reward_model",
        settings=section_settings(cfg, "reward_model"),
        inputs={"data": digest(convs), "base_model": model, "mode": mode, "split": split},
        total=cfg.steps if cfg.steps > 0 else max(1, math.ceil(len(convs) / batch_size)),
        length_keys=("reward_model.steps",),
        fields={"base_model": model, "mode": mode, "use_base": False, "holdout": split},
    )


async def _train(
    ctx: StageContext,
    convs: list[list[dict[str, str]]],
    held: list[JudgeExample],
    mode: str,
) -> AsyncIterator[Event]:
    from tinker_cookbook.supervised.common import datum_from_model_input_weights

    from engine.backends.renderers import get_renderer_for

    cfg = ctx.config.reward_model
    model = ctx.model("judge")
    svc = ctx.service_client()
    train_run = train_run_for(ctx, convs, mode)
    decision = train_run.decide(resume=cfg.resume)
    yield train_run.explain(decision)
    if decision.action == "reuse":
        if (decision.entry or {}).get("use_base"):  # a train = false run chose the base judge
            record_checkpoint(ctx.workspace.results_dir, STAGE, use_base=False)
        return
    batch_size = min(cfg.batch_size, len(convs))

    async def new_client() -> Any:
        return await resolve(
            svc.create_lora_training_client(base_model=model, rank=cfg.rank, seed=cfg.seed)
        )

    for ev in await train_run.start(decision, new_client):
        yield ev
    if train_run.step == 0:
        yield LogLine(
            f"LoRA rank {cfg.rank} on judge {model} ({ctx.backend}, {mode} mode); "
            f"{len(convs)} comparisons, {len(held)} held out; {train_run.total} steps of "
            f"{batch_size}"
        )
    tc = train_run.tc
    tokenizer = tc.get_tokenizer()
    renderer = get_renderer_for(model, tokenizer)

    def to_datum(msgs: list[dict[str, str]]) -> tuple[tinker.Datum, bool]:
        """The datum, and whether max_length cut into the judge's target (the verdict is at
        the very end, so a cut comparison would train on nothing, or on half a verdict)."""
        mi, weights = renderer.build_supervised_example(msgs)
        datum = datum_from_model_input_weights(mi, weights, max_length=cfg.max_length)
        kept = float(datum.loss_fn_inputs["weights"].to_torch().sum())
        return datum, kept < float(sum(float(w) for w in weights))

    built = await asyncio.to_thread(lambda: [to_datum(c) for c in convs])
    data = [d for d, cut in built if not cut]
    if len(data) < len(built):
        yield LogLine(
            f"{len(built) - len(data)} of {len(built)} comparisons are longer than "
            f"reward_model.max_length = {cfg.max_length} tokens and were left out (their verdict "
            "would be cut off); raise reward_model.max_length to keep them",
            "warning",
        )
    if not data:
        raise StageError(
            f"every comparison is longer than reward_model.max_length = {cfg.max_length} "
            "tokens: raise it (e.g. --set reward_model.max_length=2048)"
        )

    async def evaluate(step: int) -> AsyncIterator[Event]:
        if not held:
            return
        client = await resolve(tc.save_weights_and_get_sampling_client(f"eval-{step:06d}"))
        sampler = Sampler(client=client, renderer=renderer, tokenizer=tokenizer, model=model)
        judge = Judge(
            sampler,
            mode=mode,
            concurrency=ctx.config.reward_model.concurrency,
            **combine_settings(ctx),
        )
        m = await heldout_metrics(judge, held)
        yield Metric("rm/heldout_accuracy", step, m["accuracy"])
        yield Metric("rm/unparsable_rate", step, m["unparsable_rate"])
        if "position_consistency" in m:
            yield Metric("rm/position_consistency", step, m["position_consistency"])

    async def one_step(step: int) -> AsyncIterator[Event]:
        batch = [data[i] for i in batch_indices(step, len(data), batch_size, cfg.seed)]
        yield Metric("train/loss", step + 1, await supervised_step(tc, batch, adam(ctx, cfg.lr)))

    async def after(step: int) -> AsyncIterator[Event]:
        if train_run.due(step, cfg.checkpoint_every):
            async for ev in evaluate(step):
                yield ev

    if train_run.step == 0:
        async for ev in evaluate(0):
            yield ev
    async for ev in train_run.steps(
        one_step, label="reward-model: steps", checkpoint_every=cfg.checkpoint_every, after=after
    ):
        yield ev
    async for ev in evaluate(train_run.step):
        yield ev
