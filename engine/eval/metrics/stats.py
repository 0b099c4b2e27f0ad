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
