"""Win rates with 95% intervals, win-rate matrices, and the person's blind A/B picks.

Every preference here follows :mod:`engine.llm.judge`'s sign convention: 1 means the first
method (A) won, -1 the second (B), 0 a tie. Ties count as half a win.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (95% by default).

    centre = (p + z²/2n) / (1 + z²/n), half-width = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    ``successes`` may be fractional (ties counted as halves). With ``n = 0`` nothing is
    known: (0, 1).
    """
    if n <= 0:
        return (0.0, 1.0)
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class WinRate:
    """The first side's record against the second: rate = (wins + ties/2) / n."""

    wins: int
    losses: int
    ties: int

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def rate(self) -> float | None:
        return (self.wins + 0.5 * self.ties) / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.wins + 0.5 * self.ties, self.n)

    def flipped(self) -> WinRate:
        """The same record from the other side."""
        return WinRate(wins=self.losses, losses=self.wins, ties=self.ties)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {**asdict(self), "n": self.n, "rate": self.rate, "low": low, "high": high}


def win_rate(preferences: Iterable[int]) -> WinRate:
    """The first side's win rate from preferences (1: first won, -1: second won, 0: tie)."""
    wins = losses = ties = 0
    for p in preferences:
        if p > 0:
            wins += 1
        elif p < 0:
            losses += 1
        else:
            ties += 1
    return WinRate(wins, losses, ties)


def win_rate_matrix(
    records: Iterable[tuple[str, str, int]], methods: Sequence[str] | None = None
) -> dict[str, dict[str, WinRate]]:
    """``matrix[a][b]``: method a's win rate against method b, from ``(a, b, preference)``
    records in either orientation. The diagonal is absent; a pair never compared has n = 0.
    ``methods`` fixes the order (default: order of first appearance)."""
    counts: dict[tuple[str, str], list[int]] = {}
    seen: list[str] = list(methods or [])
    for a, b, p in records:
        for m in (a, b):
            if m not in seen:
                seen.append(m)
        for x, y, sign in ((a, b, 1), (b, a, -1)):
            c = counts.setdefault((x, y), [0, 0, 0])
            q = p * sign
            c[0 if q > 0 else 1 if q < 0 else 2] += 1
    return {a: {b: WinRate(*counts.get((a, b), [0, 0, 0])) for b in seen if b != a} for a in seen}


def matrix_as_dict(matrix: Mapping[str, Mapping[str, WinRate]]) -> dict[str, dict[str, Any]]:
    """JSON-ready form of :func:`win_rate_matrix`."""
    return {a: {b: wr.as_dict() for b, wr in row.items()} for a, row in matrix.items()}


_CHOICE_SIGN = {"a": 1, "b": -1, "tie": 0}


def human_pick_records(picks: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, int]]:
    """``(method_a, method_b, preference)`` from blind A/B picks as the Compare tab writes
    them (``{"a": ..., "b": ..., "choice": "a"|"b"|"tie", ...}``); malformed rows are skipped."""
    out = []
    for pick in picks:
        a, b, choice = pick.get("a"), pick.get("b"), str(pick.get("choice", "")).lower()
        if isinstance(a, str) and isinstance(b, str) and a != b and choice in _CHOICE_SIGN:
            out.append((a, b, _CHOICE_SIGN[choice]))
    return out


def aggregate_human_picks(picks: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], WinRate]:
    """Per unordered method pair (keyed in sorted order), the first method's record against
    the second from the person's picks; ``.n`` is the count behind each rate."""
    out: dict[tuple[str, str], WinRate] = {}
    for a, b, p in human_pick_records(picks):
        key, sign = ((a, b), p) if a <= b else ((b, a), -p)
        prev = out.get(key, WinRate(0, 0, 0))
        out[key] = WinRate(
            prev.wins + int(sign > 0), prev.losses + int(sign < 0), prev.ties + int(sign == 0)
        )
    return out


def agreement(first: Sequence[int], second: Sequence[int]) -> tuple[int, int]:
    """How many of paired preferences agree exactly (e.g. judge vs person): (agree, n)."""
    if len(first) != len(second):
        raise ValueError("agreement needs two sequences of the same length")
    return sum(int(a == b) for a, b in zip(first, second, strict=True)), len(first)


# -- paired comparisons over the same demonstrations -------------------------------------------

BOOTSTRAP_RESAMPLES = 10_000
# Below this many pairs a resampling interval only restates the few values there are (with 2,
# every resample's mean lies between them) and a two-sided sign test cannot reach p < 0.05
# (with 5 all one way p = 0.0625): no interval is given and no difference is claimed.
MIN_PAIRED_N = 5


def sign_test(diffs: Sequence[float]) -> float | None:
    """Two-sided exact sign test of "the median difference is zero": zero differences are
    dropped, then p = min(1, 2·P(X ≤ min(pos, neg))) with X ~ Binomial(n, 1/2). None without a
    non-zero difference."""
    pos = sum(1 for d in diffs if d > 0)
    neg = sum(1 for d in diffs if d < 0)
    n = pos + neg
    if n == 0:
        return None
    tail = sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2**n
    return min(1.0, 2 * tail)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, linear between order statistics (numpy's
    default)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_means(diffs: Sequence[float], seed: int, resamples: int) -> list[float]:
    """Means of ``resamples`` resamples of ``diffs`` drawn with replacement (seeded), sorted."""
    import random

    rng = random.Random(seed)
    n = len(diffs)
    values = list(diffs)
    return sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))


def bootstrap_interval(
    diffs: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float] | None:
    """Percentile bootstrap 95% interval of the mean difference over the pairs (seeded); None
    with fewer than ``MIN_PAIRED_N`` pairs (see there)."""
    if len(diffs) < MIN_PAIRED_N:
        return None
    means = bootstrap_means(diffs, seed, resamples)
    return (percentile(means, 0.025), percentile(means, 0.975))


@dataclass(frozen=True)
class PairedDifference:
    """``a`` minus ``b`` on the same items: the mean difference, its bootstrap 95% interval
    (None below ``MIN_PAIRED_N`` pairs), the sign test, and how many of each sign."""

    n: int
    mean: float | None
    ci: tuple[float, float] | None
    sign_test_p: float | None
    a_lower: int  # pairs where a's value is below b's
    b_lower: int
    ties: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "diff": self.mean,
            "ci": list(self.ci) if self.ci else None,
            "sign_test_p": self.sign_test_p,
            "a_lower": self.a_lower,
            "b_lower": self.b_lower,
            "ties": self.ties,
            "excludes_zero": self.excludes_zero,
        }


def paired_difference(
    a: Sequence[float | None],
    b: Sequence[float | None],
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> PairedDifference:
    """``a[i] - b[i]`` over the items where both have a value."""
    if len(a) != len(b):
        raise ValueError("paired_difference needs two sequences of the same length")
    diffs = [
        float(x) - float(y)
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    return PairedDifference(
        n=len(diffs),
        mean=sum(diffs) / len(diffs) if diffs else None,
        ci=bootstrap_interval(diffs, seed, resamples),
        sign_test_p=sign_test(diffs),
        a_lower=sum(1 for d in diffs if d < 0),
        b_lower=sum(1 for d in diffs if d > 0),
        ties=sum(1 for d in diffs if d == 0),
    )
