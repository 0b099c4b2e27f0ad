"""The evaluate stage's arithmetic and files, free of models: every number in
``results/evaluation.json`` is computed here from per-sample records, so each one can be
traced back to texts (``results/evaluation_samples.jsonl``, ``evaluation_judgements.jsonl``).

Conventions
-----------
- A *method* is named as the Compare tab names it: ``baseline`` (the base policy),
  ``prompting`` (the base policy with the system prompt), ``few-shot`` (the base policy with
  the training demonstrations as earlier user/assistant turns), and every policy checkpoint
  in ``results/checkpoints.toml`` by its stage name (``sft``, ``rlaif``, ``ditto``, ...).
- Means come with a 95% Student-t interval over their units (held-out requests for NLL,
  samples for style and similarity); proportions (win rates, agreement) with a Wilson
  interval. ``n`` is always the count behind the number.
- Preferences follow :mod:`engine.llm.judge`: 1 = the first method won, -1 = the second, 0 tie.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.eval.metrics.likelihood import Nll
from engine.eval.metrics.stats import (
    WinRate,
    aggregate_human_picks,
    human_pick_records,
    matrix_as_dict,
    wilson_interval,
    win_rate_matrix,
)
from engine.store import results

# --------------------------------------------------------------------------- files

SAMPLES_FILE = results.EVALUATION_SAMPLES_FILE
JUDGEMENTS_FILE = results.EVALUATION_JUDGEMENTS_FILE
EVALUATION_FILE = results.EVALUATION_FILE
DEV_FILE = results.RL_DEV_FILE
VERSION = 1

METHOD_LABELS = {
    "baseline": "base",
    "prompting": "prompted",
    "few-shot": "few-shot",
    "sft": "SFT",
    "rlaif": "RLAIF",
    "ditto": "DITTO",
    "sft-demos": "SFT on demos",
}


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


write_evaluation = results.write_evaluation
read_evaluation = results.read_evaluation
write_jsonl = results.write_evaluation_rows
read_rows = results.read_evaluation_rows
read_preferences = results.read_preferences


# --------------------------------------------------------------------------- means

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t95(df: int) -> float:
    if df < 1:
        return float("inf")
    return _T95[df - 1] if df <= len(_T95) else 1.96


def mean_interval(
    values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)
) -> dict[str, Any]:
    """``{"mean", "low", "high", "n", "sd"}``: the mean with a 95% t interval (none for n < 2),
    clipped to the quantity's ``bounds``. NaN values are dropped."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "sd": None}
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    low, high = max(bounds[0], mean - half), min(bounds[1], mean + half)
    return {"mean": mean, "low": low, "high": high, "n": n, "sd": sd}


def nll_summary(per_request: Sequence[Nll]) -> dict[str, Any]:
    """NLL per token of the person's held-out texts. ``mean``: pooled over tokens (Σ NLL /
    Σ tokens); ``low``/``high``: t interval over the per-request means; ``n``: requests."""
    pooled = sum(per_request, Nll(0.0, 0.0))
    spread = mean_interval([x.mean for x in per_request], (0.0, math.inf))
    return {
        "mean": pooled.mean if pooled.tokens else None,
        "low": spread["low"],
        "high": spread["high"],
        "n": len(per_request),
        "tokens": pooled.tokens,
        "per_request": [x.mean for x in per_request],
    }


# --------------------------------------------------------------------------- judge


def judge_matrix(
    records: Iterable[tuple[str, str, int]], methods: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """``[a][b]``: a's win rate against b (ties half) with a Wilson interval and n."""
    return matrix_as_dict(win_rate_matrix(records, methods))


def overall_record(records: Iterable[tuple[str, str, int]], method: str) -> WinRate:
    """``method``'s record against every other method pooled (its row of the matrix summed)."""
    wins = losses = ties = 0
    for a, b, p in records:
        if method not in (a, b) or a == b:
            continue
        q = p if a == method else -p
        wins += q > 0
        losses += q < 0
        ties += q == 0
    return WinRate(wins, losses, ties)


def judge_wins_per_sample(judgements: Iterable[Mapping[str, Any]]) -> dict[str, list[int]]:
    """sample id -> [wins, losses, ties] over the judgements it took part in."""
    out: dict[str, list[int]] = {}
    for j in judgements:
        p = int(j["preference"])
        for sid, sign in ((j["a"], 1), (j["b"], -1)):
            c = out.setdefault(sid, [0, 0, 0])
            q = p * sign
            c[0 if q > 0 else 1 if q < 0 else 2] += 1
    return out


# --------------------------------------------------------------------------- the person's picks


def human_summary(
    picks: Sequence[Mapping[str, Any]],
    judgements: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
) -> dict[str, Any]:
    """The person's blind picks per method pair (Wilson intervals, counts), each method's
    pooled record, and how often the judge agrees with the person on the same pairs.

    Agreement per pick: the judge's verdict for the same two methods on the same request
    (the sum of its preferences over the samples compared there) when it judged that
    request; else its overall verdict on the pair (its matrix cell: above one half, below,
    or exactly one half = tie). ``basis`` counts which of the two each pick used.
    """
    records = human_pick_records(picks)
    pairs = [
        {"a": a, "b": b, **wr.as_dict()}
        for (a, b), wr in sorted(aggregate_human_picks(picks).items())
    ]
    per_method = {m: overall_record(records, m).as_dict() for m in methods}
    per_request: dict[tuple[str, str, str], int] = {}
    per_pair: dict[tuple[str, str], int] = {}
    for j in judgements:
        a, b, p = j["method_a"], j["method_b"], int(j["preference"])
        key_in = (str(j.get("input", "")).strip(), a, b)
        per_request[key_in] = per_request.get(key_in, 0) + p
        per_request[(key_in[0], b, a)] = per_request.get((key_in[0], b, a), 0) - p
        per_pair[(a, b)] = per_pair.get((a, b), 0) + p
        per_pair[(b, a)] = per_pair.get((b, a), 0) - p
    agree = n = by_request = by_pair = 0
    rows = []
    valid = [p for p in picks if human_pick_records([p])]
    for pick, (a, b, person) in zip(valid, records, strict=True):
        key = (str(pick.get("input", "")).strip(), a, b)
        if key in per_request:
            judge, basis = _sign(per_request[key]), "request"
            by_request += 1
        elif (a, b) in per_pair:
            judge, basis = _sign(per_pair[(a, b)]), "pair"
            by_pair += 1
        else:
            continue
        n += 1
        agree += int(judge == person)
        rows.append(
            {"input": key[0], "a": a, "b": b, "person": person, "judge": judge, "basis": basis}
        )
    low, high = wilson_interval(agree, n)
    return {
        "n_picks": len(records),
        "pairs": pairs,
        "per_method": per_method,
        "agreement": {
            "agree": agree,
            "n": n,
            "rate": agree / n if n else None,
            "low": low,
            "high": high,
            "by_request": by_request,
            "by_pair": by_pair,
            "picks": rows,
        },
    }


def _sign(x: float) -> int:
    return 1 if x > 0 else -1 if x < 0 else 0


# --------------------------------------------------------------------------- reward hacking

DRIFT_Z = 2.0  # length drift: this many of the person's standard deviations (floor 10 words)


def reward_hacking_candidates(
    samples: Sequence[Mapping[str, Any]],
    judgements: Sequence[Mapping[str, Any]],
    picks: Sequence[Mapping[str, Any]],
    person_length: tuple[float, float],
    methods: Sequence[str],
    limit: int = 20,
) -> list[dict[str, Any]]:
    """Samples the judge prefers (more wins than losses) that the person rejects or that
    drift away from the person: the person picked against that method on that request in a
    blind pick, or the sample's length is more than ``DRIFT_Z`` of the person's standard
    deviations (at least 10 words) from the person's mean length, or its style distance is
    above 2 (a typical feature two of the person's standard deviations off).
    ``person_length`` = (mean, sd) of the person's length in words."""
    wins = judge_wins_per_sample(judgements)
    rejected: set[tuple[str, str]] = set()
    for pick in picks:
        recs = human_pick_records([pick])
        if not recs:
            continue
        a, b, p = recs[0]
        loser = b if p > 0 else a if p < 0 else None
        if loser:
            rejected.add((str(pick.get("input", "")).strip(), loser))
    mean_len, sd_len = person_length
    scale = max(sd_len, 10.0)
    out = []
    for s in samples:
        if s.get("method") not in methods:
            continue
        w, lo, _t = wins.get(s["id"], [0, 0, 0])
        if w <= lo:
            continue
        reasons = []
        if (str(s.get("input", "")).strip(), s["method"]) in rejected:
            reasons.append("the person picked against this method on this request")
        z = (float(s.get("length_words", 0)) - mean_len) / scale
        if abs(z) > DRIFT_Z:
            reasons.append(
                f"length {int(s.get('length_words', 0))} words vs the person's {mean_len:.0f} "
                f"({z:+.1f} sd)"
            )
        dist = s.get("style_distance")
        if dist is not None and dist > 2.0:
            reasons.append(f"style distance {dist:.2f}")
        if reasons:
            out.append(
                {
                    "id": s["id"],
                    "method": s["method"],
                    "input": s.get("input", ""),
                    "output": s.get("output", ""),
                    "judge_wins": w,
                    "judge_losses": lo,
                    "reasons": reasons,
                }
            )
    out.sort(key=lambda r: (-(r["judge_wins"] - r["judge_losses"]), r["id"]))
    return out[:limit]


# --------------------------------------------------------------------------- cost


def training_cost(run_dir: Path | None) -> dict[str, Any]:
    """What a trained method's run cost, from its ``events.jsonl``: wall seconds from the
    first to the last event, training steps (the highest step of a ``train/`` metric) and
    tokens trained (the sum of metrics whose name ends in ``tokens``, when the stage logs
    them; None otherwise)."""
    out: dict[str, Any] = {"run": None, "seconds": None, "steps": None, "tokens": None}
    if run_dir is None:
        return out
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return out
    out["run"] = str(run_dir)
    first = last = None
    steps = 0
    tokens = 0.0
    saw_tokens = False
    for row in read_rows(path):
        ts = row.get("ts")
        if isinstance(ts, int | float):
            first = ts if first is None else first
            last = ts
        if row.get("type") == "Metric":
            name = str(row.get("name", ""))
            if name.startswith("train/"):
                steps = max(steps, int(row.get("step", 0)))
            if name.endswith("tokens"):
                tokens += float(row.get("value", 0.0))
                saw_tokens = True
    out["seconds"] = (last - first) if first is not None and last is not None else None
    out["steps"] = steps or None
    out["tokens"] = tokens if saw_tokens else None
    return out


def training_curves(run_dir: Path | None) -> dict[str, list[tuple[int, float]]]:
    """Every metric series of a run (``metrics.jsonl``, else ``events.jsonl``): name -> [(step, value)]."""
    if run_dir is None:
        return {}
    rows = read_rows(Path(run_dir) / "metrics.jsonl") or read_rows(Path(run_dir) / "events.jsonl")
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("type", "Metric") != "Metric" or "name" not in r:
            continue
        try:
            out.setdefault(str(r["name"]), []).append((int(r["step"]), float(r["value"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


# --------------------------------------------------------------------------- summary


# Columns of the summary table: key, header, which way is better.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("nll", "NLL/token of your text", "low"),
    ("style_distance", "style distance", "low"),
    ("similarity", "MiniLM similarity", "high"),
    ("judge", "judge win rate (all)", "high"),
    ("dev", "dev win rate vs base", "high"),
    ("human", "your picks win rate", "high"),
    ("sampled_tokens", "tokens sampled", "none"),
    ("train_seconds", "training time (s)", "none"),
)


SPLIT_CHANGED_MARK = "(held-out set changed since training: may have trained on it)"


def judge_decided_nothing(evaluation: Mapping[str, Any]) -> bool:
    """The judge ran and decided (almost) none of its comparisons: its win rates are ties,
    not results (engine.judge.ALMOST_NOTHING)."""
    from engine.llm.judge import ALMOST_NOTHING

    judge = evaluation.get("judge") or {}
    stats = judge.get("stats") or {}
    n = stats.get("comparisons") or 0
    if not judge.get("used") or not n:
        return False
    share = stats.get("decided_share")
    if share is None:  # written before the share was recorded
        share = ((stats.get("wins_a") or 0) + (stats.get("wins_b") or 0)) / n
    return share < ALMOST_NOTHING


def judge_trust_notes(evaluation: Mapping[str, Any]) -> list[str]:
    """Why not to trust the judge's numbers in an evaluation, in plain sentences (empty:
    no reason found). For the report and the Compare tab."""
    from engine.eval.judge_trust import judge_warnings

    judge = evaluation.get("judge") or {}
    if not judge.get("used"):
        return []
    if "warnings" in judge:
        return list(judge["warnings"])
    return judge_warnings(judge.get("stats"), judge.get("accuracy"))


def summary_rows(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One plain row per method for the report table and the Compare tab: each column's
    value, interval and n, plus ``best`` (the column keys where this method is best) and
    ``split_changed`` (a checkpoint trained with another held-out set; its label says so)."""
    rows = []
    no_decisions = judge_decided_nothing(evaluation)
    for m in evaluation.get("methods", []):
        name = m["name"]
        met = evaluation.get("metrics", {}).get(name, {})
        human = evaluation.get("human", {}).get("per_method", {}).get(name) or {}
        cells = {
            "nll": _cell(met.get("nll")),
            "style_distance": _cell(met.get("style_distance")),
            "similarity": _cell(met.get("embedding_similarity")),
            "judge": _cell(met.get("judge_vs_all"), "rate"),
            "dev": _cell(met.get("dev_vs_baseline"), "rate"),
            "human": _cell(human, "rate"),
            "sampled_tokens": {"value": met.get("cost", {}).get("sampled_tokens"), "n": None},
            "train_seconds": {
                "value": (met.get("cost", {}).get("training") or {}).get("seconds"),
                "n": None,
            },
        }
        if no_decisions:  # ties only: no win rate to show as a result
            for key in ("judge", "dev"):
                cells[key] = {**_cell(None), "n": cells[key]["n"]}
        label = m.get("label", name)
        if m.get("split_changed"):  # trained with another held-out set: may have seen these
            label += f" {SPLIT_CHANGED_MARK}"
        rows.append(
            {
                "method": name,
                "label": label,
                "cells": cells,
                "best": [],
                "split_changed": bool(m.get("split_changed")),
            }
        )
    for key, _header, better in COLUMNS:
        if better == "none":
            continue
        values = [r["cells"][key]["value"] for r in rows if r["cells"][key]["value"] is not None]
        if len(values) < 2:
            continue
        best = min(values) if better == "low" else max(values)
        if all(v == best for v in values):
            continue  # nobody is best when everyone is equal
        for r in rows:
            if r["cells"][key]["value"] == best:
                r["best"].append(key)
    return rows


def _cell(d: Mapping[str, Any] | None, key: str = "mean") -> dict[str, Any]:
    if not d or not d.get("n"):
        return {"value": None, "low": None, "high": None, "n": (d or {}).get("n", 0)}
    return {"value": d.get(key), "low": d.get("low"), "high": d.get("high"), "n": d.get("n")}
