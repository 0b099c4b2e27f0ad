"""Pooling the folds: every demonstration measured once, by methods that never trained on it.

Before anything is pooled each fold is checked: its split is the held-out slice the plan dealt
it, its evaluation measured exactly that slice, and every checkpoint it measured records that
slice's split fingerprint (engine.store.split.split_fingerprint). A fold that fails a check is refused
with a message naming the fold, the method and what to do; nothing is written.

Then per demonstration and method: NLL per token of the person's text (and its tokens), mean
style distance and MiniLM similarity of the samples, the judge's win score; per method the
pooled values with 95% intervals and n; per method the paired differences against base and
few-shot (engine.eval.paired). Writes results/crossval.json, results/crossval_report.md and
results/plots/crossval_*.png, with a copy of the JSON in the cross-validation's folder.
"""

from __future__ import annotations

import math
from typing import Any

from engine.crossval.folds import CrossvalError, fold_split
from engine.crossval.plan import CrossvalPlan
from engine.eval import evaluation as ev
from engine.eval.metrics.likelihood import Nll
from engine.eval.paired import PAIRED_METRICS, paired_comparisons, per_demo_tables
from engine.pipeline.runner import list_runs, load_run_events
from engine.store.atomic import atomic_write_json
from engine.store.checkpoints import read_registry
from engine.store.split import _norm, split_fingerprint
from engine.store.workspace import Workspace

RESULT_FILE = "crossval.json"
VERSION = 1


def _same(a: list[str], b: list[str]) -> bool:
    return sorted(map(_norm, a)) == sorted(map(_norm, b))


def _stage_of(method: str) -> str:
    """The stage that trains ``method`` (sft-demos is ditto's SFT initialisation)."""
    return "ditto" if method == "sft-demos" else method


def check_fold(plan: CrossvalPlan, i: int) -> dict[str, Any]:
    """Fold ``i``'s evaluation, rows and judgements after its checks (CrossvalError if one
    fails)."""
    ws = Workspace(plan.fold_dir(i))
    name = f"fold {i} ({ws.root.parent.name}/{ws.root.name})"
    split = fold_split(ws)
    want = plan.holdouts[i - 1]
    if not _same([d["input"] for d in split.holdout], want):
        raise CrossvalError(
            f"{name}: its data/holdout.json no longer holds out the fold's requests; "
            "start the cross-validation again with --new"
        )
    data = ev.read_evaluation(ws.results_dir)
    if data is None:
        raise CrossvalError(f"{name}: no results/{ev.EVALUATION_FILE}; run persona crossval")
    rerun = f"persona -C {plan.root.parent.name}/{plan.root.name}/{ws.root.name} run"
    if not _same(list(data.get("holdout", {}).get("inputs", [])), want):
        raise CrossvalError(
            f"{name}: its evaluation measured other requests than the fold holds out; "
            f"run `{rerun} evaluate` from the workspace, then persona crossval again"
        )
    expected = split_fingerprint(split)
    registry = read_registry(ws.results_dir)
    for m in data.get("methods", []):
        if m.get("kind") != "checkpoint":
            continue
        got = (registry.get(m["name"]) or {}).get("holdout")
        if got != expected or m.get("split_changed"):
            raise CrossvalError(
                f"{name}: the {m['name']} checkpoint records held-out set {got or 'none'}, "
                f"not the fold's {expected}: it may have trained on the requests it is "
                "measured on, so this fold is not pooled. Retrain it on the fold's split "
                f"(`{rerun} {_stage_of(m['name'])}`, then `{rerun} evaluate`, from the "
                "workspace) and run persona crossval again."
            )
    return {
        "evaluation": data,
        "rows": ev.read_rows(ws.result(ev.SAMPLES_FILE)),
        "judgements": ev.read_rows(ws.result(ev.JUDGEMENTS_FILE)),
    }


def fold_wall_seconds(plan: CrossvalPlan) -> list[dict[str, float]]:
    """Per fold (the shared stages first when there are any), each stage's wall time over all
    its runs (a resumed stage counts every attempt)."""
    out = []
    for i in ([0] if plan.shared else []) + list(range(1, plan.k + 1)):
        ws = Workspace(plan.fold_dir(i))
        per: dict[str, float] = {}
        for stage in plan.shared if i == 0 else plan.stages:
            total = 0.0
            for run in list_runs(ws, stage):
                events = load_run_events(run)
                if events:
                    total += events[-1].ts - events[0].ts
            per[stage] = round(total, 2)
        out.append(per)
    return out


def _interval(values: list[float], bounds: tuple[float, float]) -> dict[str, Any]:
    return ev.mean_interval(values, bounds)


def pool(plan: CrossvalPlan, resamples: int) -> dict[str, Any]:
    """The pooled numbers (raises CrossvalError when a fold cannot be pooled)."""
    folds = [check_fold(plan, i) for i in range(1, plan.k + 1)]
    rows = [r for f in folds for r in f["rows"]]
    judgements = [j for f in folds for j in f["judgements"] if j.get("set") == "heldout"]
    measured = [m for m in plan.methods if any(r.get("method") == m for r in rows)]
    missing = [m for m in plan.methods if m not in measured]
    tables = per_demo_tables(rows, judgements)
    nll_rows = {(r["method"], r["input"]): r for r in rows if r.get("kind") == "nll"}
    fold_of = {_norm(t): i for i, h in enumerate(plan.holdouts, start=1) for t in h}
    methods: dict[str, Any] = {}
    for m in measured:
        nlls = [
            Nll(float(r["nll_total"]), float(r["tokens"]))
            for (mm, _), r in nll_rows.items()
            if mm == m
        ]
        bounds = {"similarity": (-1.0, 1.0), "judge": (0.0, 1.0)}
        entry: dict[str, Any] = {"label": ev.method_label(m), "nll": ev.nll_summary(nlls)}
        entry["nll"].pop("per_request", None)
        for metric in ("style_distance", "similarity", "judge"):
            vals = list(tables[metric].get(m, {}).values())
            entry[metric] = _interval(vals, bounds.get(metric, (0.0, math.inf)))
        methods[m] = entry
    demos = []
    for i, held in enumerate(plan.folds, start=1):
        for pos, text in zip(held, plan.holdouts[i - 1], strict=True):
            per = {
                m: {metric: tables[metric].get(m, {}).get(text) for metric in PAIRED_METRICS}
                for m in measured
            }
            demos.append({"demo": pos + 1, "fold": fold_of[_norm(text)], "input": text, **per})
    return {
        "version": VERSION,
        "folds": plan.k,
        "seed": plan.seed,
        "n_demonstrations": sum(len(f) for f in plan.folds),
        "fold_holdout": [[p + 1 for p in f] for f in plan.folds],
        "methods_asked": plan.methods,
        "methods_missing": missing,
        "methods": methods,
        "per_demonstration": sorted(demos, key=lambda d: d["demo"]),
        "judge_matrix": ev.judge_matrix(
            [(j["method_a"], j["method_b"], int(j["preference"])) for j in judgements], measured
        ),
        "paired": paired_comparisons(tables, measured, seed=plan.seed, resamples=resamples),
        "fold_wall_s": fold_wall_seconds(plan),
        "backend": folds[0]["evaluation"].get("backend"),
        "policy_model": folds[0]["evaluation"].get("policy_model"),
        "samples_per_request": folds[0]["evaluation"].get("samples_per_request"),
        "run": plan.root.name,
    }


def write_pooled(ws: Workspace, plan: CrossvalPlan) -> tuple[list[Any], str]:
    """Pool, write results/crossval.json, the report and its plots; (paths, summary line)."""
    from engine.crossval.report import write_crossval_report
    from engine.store.config import ConfigError

    try:
        resamples = Workspace(plan.fold_dir(1)).config(plan.overrides).crossval.resamples
    except ConfigError:
        resamples = 10_000
    data = pool(plan, resamples)
    data["created"] = plan.created
    path = atomic_write_json(ws.result(RESULT_FILE), data)
    atomic_write_json(plan.root / RESULT_FILE, data)
    written = [path, *write_crossval_report(ws, data)]
    n = data["n_demonstrations"]
    claims = [
        pd["verdict"]
        for per in data["paired"]["by_reference"].get("few-shot", {}).values()
        for metric, pd in per.items()
        if metric == "nll" and pd.get("excludes_zero")
    ]
    summary = f"{len(data['methods'])} methods on {n} demonstrations in {plan.k} folds; " + (
        "; ".join(claims) if claims else "no NLL difference against few-shot measurable"
    )
    return written, summary
