"""Paired comparisons of methods on the same held-out demonstrations, in numbers and in words.

Evaluate (one split, n = its held-out requests) and crossval (every demonstration held out once,
pooled) both measure each method on each demonstration, so two methods can be compared
demonstration by demonstration: the difference per demonstration, its mean, a seeded bootstrap
95% interval and a sign test (engine.eval.metrics.stats). A difference is put in words ("A is closer
to your writing than B") only where the interval excludes zero; otherwise the words say that no
difference is measurable with this many demonstrations.

The per-demonstration values come from evaluation_samples.jsonl and evaluation_judgements.jsonl
rows (the same rows in both cases), keyed by the demonstration's request text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from engine.eval.evaluation import method_label
from engine.eval.metrics.stats import BOOTSTRAP_RESAMPLES, MIN_PAIRED_N, paired_difference

# metric -> (what it is, True when a lower value is closer to the person's writing)
PAIRED_METRICS: dict[str, tuple[str, bool]] = {
    "nll": ("NLL per token of your text", True),
    "style_distance": ("style distance", True),
    "similarity": ("MiniLM similarity", False),
    "judge": ("judge win score", False),
}
REFERENCES = ("baseline", "few-shot")  # every method is compared with these two
# A sign test p below this confirms an interval that excludes zero; above it (and with some
# demonstrations the other way) the words say how many demonstrations carry the difference.
SIGN_TEST_CONFIRMS = 0.05

Table = dict[str, dict[str, float]]  # method -> request text -> value


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def per_demo_tables(
    sample_rows: Iterable[Mapping[str, Any]], judgements: Iterable[Mapping[str, Any]] = ()
) -> dict[str, Table]:
    """metric -> method -> request -> value, from evaluate's rows: NLL per token (the ``nll``
    rows), the mean style distance and MiniLM similarity of the method's samples for the request,
    and the judge win score (wins + ties/2 over the held-out comparisons it took part in)."""
    lists: dict[str, dict[str, dict[str, list[float]]]] = {k: {} for k in PAIRED_METRICS}

    def add(metric: str, method: str, request: str, value: Any) -> None:
        if isinstance(value, int | float):
            lists[metric].setdefault(method, {}).setdefault(request, []).append(float(value))

    for row in sample_rows:
        method, request = row.get("method"), row.get("input")
        if not isinstance(method, str) or not isinstance(request, str):
            continue
        if row.get("kind") == "nll":
            add("nll", method, request, row.get("nll_mean"))
        elif row.get("kind") == "sample":
            add("style_distance", method, request, row.get("style_distance"))
            add("similarity", method, request, row.get("similarity"))
    for j in judgements:
        if j.get("set", "heldout") != "heldout" or not isinstance(j.get("input"), str):
            continue
        p = int(j.get("preference", 0))
        score = 1.0 if p > 0 else 0.0 if p < 0 else 0.5
        add("judge", str(j["method_a"]), j["input"], score)
        add("judge", str(j["method_b"]), j["input"], 1.0 - score)
    return {
        metric: {
            m: {r: v for r, xs in by.items() if (v := _mean(xs)) is not None} for m, by in t.items()
        }
        for metric, t in lists.items()
    }


def verdict(a: str, b: str, metric: str, pd: Mapping[str, Any]) -> str:
    """The comparison in words: a claim only where the paired interval excludes zero."""
    n = int(pd.get("n") or 0)
    if not pd.get("excludes_zero"):
        return f"no difference measurable with {n} demonstration{'s' if n != 1 else ''}"
    lower_closer = PAIRED_METRICS[metric][1]
    a_closer = (pd["diff"] < 0) == lower_closer
    first, second = (a, b) if a_closer else (b, a)
    words = f"{method_label(first)} is closer to your writing than {method_label(second)}"
    # A bootstrap over few demonstrations can exclude zero on a mean that a few large
    # differences carry: where not every demonstration agrees and the sign test does not
    # confirm it, the words say how many do.
    a_lower, b_lower = int(pd.get("a_lower") or 0), int(pd.get("b_lower") or 0)
    agree = a_lower if a_closer == lower_closer else b_lower
    p = pd.get("sign_test_p")
    if p is None or p < SIGN_TEST_CONFIRMS or agree >= n:
        return words
    return (
        f"{words} on average, but closer on only {agree} of {n} demonstrations (sign test "
        f"p = {p:.2f}: not confirmed)"
    )


def paired_comparisons(
    tables: Mapping[str, Table],
    methods: Sequence[str],
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """``[reference][method][metric]``: method minus reference on the requests both were
    measured on (diff, ci, n, sign_test_p, verdict), for each reference in REFERENCES that is
    among ``methods``."""
    out: dict[str, Any] = {
        "min_n": MIN_PAIRED_N,
        "resamples": resamples,
        "seed": seed,
        "by_reference": {},
    }
    for ref in REFERENCES:
        if ref not in methods:
            continue
        per_method: dict[str, Any] = {}
        for m in methods:
            if m == ref:
                continue
            per_metric: dict[str, Any] = {}
            for metric in PAIRED_METRICS:
                table = tables.get(metric, {})
                mine, theirs = table.get(m, {}), table.get(ref, {})
                requests = sorted(set(mine) & set(theirs))
                if not requests:
                    continue
                pd = paired_difference(
                    [mine[r] for r in requests],
                    [theirs[r] for r in requests],
                    seed=seed,
                    resamples=resamples,
                ).as_dict()
                pd["verdict"] = verdict(m, ref, metric, pd)
                per_metric[metric] = pd
            per_method[m] = per_metric
        out["by_reference"][ref] = per_method
    return out


def _num(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def markdown(paired: Mapping[str, Any] | None) -> list[str]:
    """The paired comparisons as report lines (empty without any)."""
    if not paired or not paired.get("by_reference"):
        return []
    lines = [
        "## Paired differences (same demonstrations)\n",
        "Each method minus the reference on the same held-out demonstrations: the mean "
        "difference, a bootstrap 95% interval over demonstrations "
        f"({paired.get('resamples')} resamples, seed {paired.get('seed')}; none below "
        f"{paired.get('min_n')} demonstrations, too few to resample) and a two-sided sign test. "
        "A method is called closer to your writing only where the interval excludes zero.\n",
    ]
    for ref, per_method in paired["by_reference"].items():
        lines.append(f"**Against {method_label(ref)}**\n")
        lines.append("| method | metric | difference | 95% interval | sign test p | n | in words |")
        lines.append("|---|---|---|---|---|---|---|")
        for m, per_metric in per_method.items():
            for metric, pd in per_metric.items():
                ci = pd.get("ci")
                ci_s = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "too few"
                p = pd.get("sign_test_p")
                lines.append(
                    f"| {method_label(m)} | {PAIRED_METRICS[metric][0]} | {_num(pd.get('diff'))} "
                    f"| {ci_s} | {'–' if p is None else f'{p:.3f}'} | {pd.get('n')} "
                    f"| {pd.get('verdict')} |"
                )
        lines.append("")
    return lines


# The single-split report's sections that follow its summary table: the paired section goes
# before the first of them that is there.
_AFTER_SUMMARY = ("\n## Plots\n", "\n## Judge win-rate matrix", "\n## Analysis\n")


def insert_section(report: str, paired: Mapping[str, Any] | None) -> str:
    """``report`` (report.md's text) with the paired section after its summary."""
    lines = markdown(paired)
    if not lines:
        return report
    section = "\n".join(lines).rstrip() + "\n"
    for heading in _AFTER_SUMMARY:
        at = report.find(heading)
        if at >= 0:
            return report[: at + 1] + section + report[at:]
    return report.rstrip() + "\n\n" + section


__all__ = [
    "PAIRED_METRICS",
    "REFERENCES",
    "insert_section",
    "markdown",
    "paired_comparisons",
    "per_demo_tables",
]
