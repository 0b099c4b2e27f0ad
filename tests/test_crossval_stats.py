"""Paired comparisons by hand: the sign test, the bootstrap interval against the exact bootstrap
distribution, the per-demonstration tables from evaluate's rows, and the words."""

from __future__ import annotations

import itertools
import math

import pytest

from engine.eval.metrics.stats import (
    MIN_PAIRED_N,
    bootstrap_interval,
    paired_difference,
    percentile,
    sign_test,
)
from engine.eval.paired import insert_section, paired_comparisons, per_demo_tables, verdict


def test_sign_test_by_hand():
    # 5 negative, 1 positive, 1 zero (dropped): n = 6, P(X <= 1) = (1 + 6) / 64
    assert sign_test([-1, -2, -0.5, -3, -1, 2, 0]) == pytest.approx(2 * 7 / 64)
    assert sign_test([-1, -1, -1, -1, -1, -1]) == pytest.approx(2 / 64)
    assert sign_test([1, -1]) == 1.0  # capped at 1
    assert sign_test([0, 0]) is None


def test_percentile_is_linear_between_order_statistics():
    xs = [1.0, 2.0, 4.0, 8.0]
    assert percentile(xs, 0.0) == 1.0 and percentile(xs, 1.0) == 8.0
    assert percentile(xs, 0.5) == pytest.approx(3.0)  # halfway between 2 and 4
    assert percentile(xs, 0.025) == pytest.approx(1.0 + 0.075 * 1.0)


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    diffs = [-3.0, -1.0, 0.0, 2.0, -2.0]
    # the exact bootstrap distribution: all 5^5 equally likely resamples, their means
    exact = sorted(sum(r) / 5 for r in itertools.product(diffs, repeat=5))
    low, high = percentile(exact, 0.025), percentile(exact, 0.975)
    got = bootstrap_interval(diffs, seed=3, resamples=40_000)
    assert got is not None
    assert got[0] == pytest.approx(low, abs=0.21) and got[1] == pytest.approx(high, abs=0.21)
    assert bootstrap_interval(diffs, seed=3, resamples=2000) == bootstrap_interval(
        diffs, seed=3, resamples=2000
    )  # seeded
    assert bootstrap_interval(diffs[: MIN_PAIRED_N - 1]) is None  # too few to resample


def test_paired_difference_on_a_small_table_by_hand():
    # method A and B on six demonstrations (None: not measured on that one)
    a = [2.0, 2.5, 3.0, 1.0, 2.2, 2.0, None]
    b = [2.5, 3.0, 3.5, 1.2, 2.0, 2.6, 1.0]
    pd = paired_difference(a, b, seed=0, resamples=4000)
    diffs = [-0.5, -0.5, -0.5, -0.2, 0.2, -0.6]
    assert pd.n == 6 and pd.mean == pytest.approx(sum(diffs) / 6)
    assert (pd.a_lower, pd.b_lower, pd.ties) == (5, 1, 0)
    assert pd.sign_test_p == pytest.approx(14 / 64)
    assert pd.ci is not None and pd.ci[0] >= min(diffs) and pd.ci[1] <= max(diffs)
    assert pd.ci[1] < 0 and pd.excludes_zero  # five of six lower, one small the other way
    d = pd.as_dict()
    # the interval excludes zero, the sign test (p = 0.22) does not: the words say both (with
    # every demonstration the same way, as in the next test's 5 of 5, they need not)
    assert verdict("ditto", "few-shot", "nll", d) == (
        "DITTO is closer to your writing than few-shot on average, but closer on only 5 of 6 "
        "demonstrations (sign test p = 0.22: not confirmed)"
    )
    # a higher similarity is closer: the same numbers read the other way
    assert verdict("ditto", "few-shot", "similarity", d) == (
        "few-shot is closer to your writing than DITTO on average, but closer on only 5 of 6 "
        "demonstrations (sign test p = 0.22: not confirmed)"
    )
    confirmed = {**d, "sign_test_p": 0.01}
    assert verdict("ditto", "few-shot", "nll", confirmed) == (
        "DITTO is closer to your writing than few-shot"
    )


def test_two_demonstrations_never_claim_a_difference():
    pd = paired_difference([2.0, 2.1], [3.0, 3.5]).as_dict()  # both far lower
    assert pd["ci"] is None and not pd["excludes_zero"]
    assert (
        verdict("ditto", "baseline", "nll", pd) == "no difference measurable with 2 demonstrations"
    )


def test_tables_from_evaluate_rows_and_comparisons():
    rows = []
    for r, (x, y) in enumerate([(2.0, 3.0), (2.1, 3.2), (1.9, 2.8), (2.0, 2.6), (2.2, 3.1)]):
        req = f"request {r}"
        rows += [
            {"kind": "nll", "method": "ditto", "input": req, "nll_mean": x},
            {"kind": "nll", "method": "baseline", "input": req, "nll_mean": y},
            {"kind": "sample", "method": "ditto", "input": req, "style_distance": 1.0},
            {"kind": "sample", "method": "ditto", "input": req, "style_distance": 3.0},
            {"kind": "sample", "method": "baseline", "input": req, "style_distance": None},
        ]
    judgements = [
        {"set": "heldout", "method_a": "ditto", "method_b": "baseline", "input": "request 0",
         "preference": 1},
        {"set": "heldout", "method_a": "baseline", "method_b": "ditto", "input": "request 0",
         "preference": 0},
        {"set": "dev", "method_a": "ditto", "method_b": "baseline", "input": "x", "preference": 1},
    ]  # fmt: skip
    tables = per_demo_tables(rows, judgements)
    assert tables["nll"]["ditto"]["request 1"] == 2.1
    assert tables["style_distance"]["ditto"]["request 0"] == 2.0  # mean of the two samples
    assert "baseline" not in tables["style_distance"]  # no value measured
    assert tables["judge"]["ditto"] == {"request 0": 0.75}  # a win and a tie; dev not counted
    assert tables["judge"]["baseline"] == {"request 0": 0.25}
    out = paired_comparisons(tables, ["baseline", "ditto"], seed=0, resamples=1000)
    nll = out["by_reference"]["baseline"]["ditto"]["nll"]
    assert nll["n"] == 5 and nll["diff"] == pytest.approx(-0.9)
    assert nll["sign_test_p"] == pytest.approx(2 / 32)
    assert nll["verdict"] == "DITTO is closer to your writing than base"
    assert "few-shot" not in out["by_reference"]  # not among the methods
    assert math.isclose(out["by_reference"]["baseline"]["ditto"]["judge"]["diff"], 0.5)


def test_the_paired_section_follows_the_summary_of_the_single_split_report():
    tables = {"nll": {"baseline": {"a": 3.0, "b": 3.1}, "ditto": {"a": 2.0, "b": 2.2}}}
    paired = paired_comparisons(tables, ["baseline", "ditto"])
    report = "# Report\n\n## Summary\n\n| t |\n\n## Plots\n\n![x](y)\n\n## Analysis\n\nz\n"
    out = insert_section(report, paired)
    head, _, tail = out.partition("## Paired differences")
    assert "## Summary" in head and "## Plots" not in head and tail.index("## Plots") > 0
    assert "| DITTO | NLL per token of your text | -0.950 | too few |" in tail
    assert "no difference measurable with 2 demonstrations" in tail
    assert insert_section(report, None) == report
    assert insert_section("# R\n", paired).startswith("# R\n\n## Paired differences")
