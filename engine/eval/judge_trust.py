"""Whether to trust the judge: its accuracy where the answer is known, and why not, in words.

On a held-out demonstration the person's own text should beat a model's sample for the same
request (:func:`person_accuracy`); :func:`judge_warnings` turns the judge's statistics and
those accuracies into sentences for the report, the Train tab and f10.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.eval.metrics.stats import win_rate
from engine.llm.judge import ALMOST_NOTHING, Comparison, Message


def accuracy_cell(
    preferences: Sequence[int], margins: Sequence[float | None] = ()
) -> dict[str, Any]:
    """How often the judge preferred the person's text, shown as A (1: right, -1: wrong,
    0: a tie, counted as half): ``{value, n, ci, right, wrong, ties}``, ci a Wilson 95%.
    With ``margins`` (each comparison's calibrated s, > 0: the person's text preferred), the
    cell keeps them as ``s`` so the tie margin can be chosen again without judging again
    (:func:`tie_margin_sweep`)."""
    wr = win_rate(preferences)
    low, high = wr.interval
    cell: dict[str, Any] = {
        "value": wr.rate,
        "n": wr.n,
        "ci": [low, high],
        "right": wr.wins,
        "wrong": wr.losses,
        "ties": wr.ties,
    }
    if margins and all(m is not None for m in margins):
        cell["s"] = [round(float(m), 4) for m in margins]  # type: ignore[arg-type]
    return cell


# Tie margins (nats of calibrated s) that tie_margin_sweep reports.
SWEEP_MARGINS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
HELD_OUT = ("vs_base", "vs_few_shot")


def tie_margin_sweep(
    cells: Mapping[str, Any], margins: Sequence[float] = SWEEP_MARGINS
) -> list[dict[str, Any]]:
    """For each tie margin: the share of held-out comparisons it leaves decided, and the
    judge's accuracy then (ties counting half, as in :func:`accuracy_cell`), pooled over
    ``vs_base`` and ``vs_few_shot``. Where every answer is known, a margin that turns only
    wrong verdicts into ties raises accuracy; one that also ties right ones lowers it.
    Empty when the cells keep no margins (sampled verdicts, or an older file)."""
    s = [m for key in HELD_OUT for m in (cells.get(key) or {}).get("s", [])]
    if not s:
        return []
    out = []
    for t in margins:
        prefs = [0 if abs(m) < t or m == 0 else (1 if m > 0 else -1) for m in s]
        cell = accuracy_cell(prefs)
        decided = sum(p != 0 for p in prefs)
        out.append(
            {
                "tie_margin": t,
                "decided_share": decided / len(s),
                "accuracy": cell["value"],
                "ci": cell["ci"],
                "n": len(s),
            }
        )
    return out


async def person_accuracy(
    judge: Any,
    cases: Mapping[str, Sequence[tuple[Sequence[Message], str, str]]],
    rubric: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Judge accuracy where the answer is known: for each case ``(conversation, person's
    text, a model's sample)`` the person's text should win. No reference is shown (it would
    be the person's text itself). Returns one :func:`accuracy_cell` per key of ``cases``
    (keys without cases are left out) and the judge's statistics over all of them."""
    keys = [k for k, rows in cases.items() if rows]
    comps = [
        Comparison(list(conv), mine, other, rubric) for k in keys for conv, mine, other in cases[k]
    ]
    old = judge.reset_stats()
    try:
        records = await judge.judge(comps) if comps else []
        stats = judge.stats.as_dict()
    finally:
        judge.stats = old
    out: dict[str, dict[str, Any]] = {}
    start = 0
    for k in keys:
        n = len(cases[k])
        mine = records[start : start + n]
        out[k] = accuracy_cell([r.preference for r in mine], [r.s for r in mine])
        start += n
    return out, stats


ACCURACY_LABELS = {
    "vs_base": "the base model's samples",
    "vs_few_shot": "the few-shot samples",
    "seen_in_training": "samples it was trained on",
}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def judge_warnings(
    stats: Mapping[str, Any] | None, accuracy: Mapping[str, Any] | None = None
) -> list[str]:
    """Plain sentences for a person, one per reason not to trust the judge's verdicts: it
    decided (almost) nothing, or on held-out demonstrations it cannot tell the person's own
    text from a model's (accuracy's interval includes 0.5, or lies below it). Empty: no
    reason found."""
    out = []
    stats = stats or {}
    n, share = stats.get("comparisons") or 0, stats.get("decided_share")
    if n and share is not None and share < ALMOST_NOTHING:
        decided = (stats.get("wins_a") or 0) + (stats.get("wins_b") or 0)
        out.append(
            f"The judge decided {decided} of {n} comparisons; the rest are ties. Its win "
            "rates are not results."
        )
    for key, cell in (accuracy or {}).items():
        if key == "seen_in_training" or not isinstance(cell, Mapping) or not cell.get("n"):
            continue
        low, high = cell["ci"]
        shown = f"{_pct(cell['value'])} [{_pct(low)}–{_pct(high)}] n={cell['n']}"
        what = ACCURACY_LABELS.get(key, key)
        if high < 0.5:
            out.append(
                f"On held-out demonstrations the judge prefers {what} to your own text "
                f"(it picks yours {shown}): RLAIF and the judge columns should not be trusted "
                "on this setup."
            )
        elif low <= 0.5:
            out.append(
                f"The judge cannot tell your writing from {what} (on held-out demonstrations "
                f"it picks yours {shown}; 50% is chance): RLAIF and the judge columns should "
                "not be trusted on this setup."
            )
    return out


def accuracy_lines(accuracy: dict[str, Any]) -> list[str]:
    """One log line per judge: how often it prefers the person's own text."""
    out = []
    for name in ("base", "trained"):
        cells = accuracy.get(name)
        if not isinstance(cells, dict):
            continue
        parts = []
        for key, label in (
            ("vs_base", "held-out vs base"),
            ("vs_few_shot", "held-out vs few-shot"),
            ("seen_in_training", "seen in training"),
        ):
            c = cells.get(key)
            if isinstance(c, dict) and c.get("n"):
                parts.append(
                    f"{label} {c['value']:.0%} [{c['ci'][0]:.0%}–{c['ci'][1]:.0%}] n={c['n']}"
                )
        if parts:
            out.append(f"{name} judge prefers your own text: " + "; ".join(parts))
    return out
