"""DITTO's replay buffer and pair mixer (pure: no model, no I/O beyond the buffer file).

Shaikh et al., "Aligning Language Models with Demonstrated Feedback" (ICLR 2025), Section 3.2:
each round samples completions from the current policy for every training request and keeps
them, tagged with the round (and the checkpoint that wrote them). Each DPO step then draws
pairs from three pools, all within one request:

  online      the demonstration  >  a sample of the current round
  replay      the demonstration  >  a sample of an earlier round
  intermodel  a sample of a later round  >  a sample of an earlier round

in the proportions ``mix`` (the paper: 70/20/10). The counts per batch are drawn by
systematic rounding (each count is the floor or the ceiling of its share, and its expectation
is exactly the share), so small batches keep the paper's proportions on average. A pool that
is empty or switched off (round 1 has no earlier round) gives its slots to online pairs; the
counts actually used are returned so the stage can log them every step.

As in the reference code, pairs of a type are drawn without replacement from the pooled
candidates of the batch's requests; only when the online pool itself runs short are online
pairs drawn again.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.store.atomic import atomic_write_json

KINDS = ("online", "replay", "intermodel")
DEMO_ROUND = -1  # the "round" of a demonstration in a pair


@dataclass(frozen=True)
class Sample:
    """One completion of the policy for one training request."""

    request: str  # the demonstration's input, as written
    round: int  # 1-based round that sampled it
    checkpoint: str  # the checkpoint it was sampled from (e.g. "sft-init", "round-1")
    text: str


@dataclass(frozen=True)
class Pair:
    request: str
    chosen: str
    rejected: str
    kind: str  # one of KINDS
    chosen_round: int  # DEMO_ROUND for the demonstration
    rejected_round: int


@dataclass
class ReplayBuffer:
    """Every round's samples, in the order they were added."""

    samples: list[Sample] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, samples: Iterable[Sample]) -> None:
        self.samples.extend(samples)

    def rounds(self) -> list[int]:
        return sorted({s.round for s in self.samples})

    def of(
        self, request: str, *, round: int | None = None, before: int | None = None
    ) -> list[Sample]:
        """Samples of ``request``: of one ``round``, or of every round before ``before``."""
        out = []
        for s in self.samples:
            if s.request != request:
                continue
            if round is not None and s.round != round:
                continue
            if before is not None and s.round >= before:
                continue
            out.append(s)
        return out

    def keep(self, predicate: Any) -> int:
        """Keep the samples for which ``predicate(sample)`` holds; return how many were dropped."""
        before = len(self.samples)
        self.samples = [s for s in self.samples if predicate(s)]
        return before - len(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "samples": [asdict(s) for s in self.samples]}

    @classmethod
    def from_json(cls, data: Any) -> ReplayBuffer:
        if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
            raise ValueError('expected {"meta": {...}, "samples": [...]}')
        samples = [
            Sample(
                request=str(s["request"]),
                round=int(s["round"]),
                checkpoint=str(s.get("checkpoint", "")),
                text=str(s["text"]),
            )
            for s in data["samples"]
        ]
        return cls(samples=samples, meta=dict(data.get("meta") or {}))

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ReplayBuffer:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def type_counts(total: int, mix: Sequence[float], u: float) -> dict[str, int]:
    """Split ``total`` slots by the shares ``mix`` (normalised) with systematic rounding at
    offset ``u`` in [0, 1): each count is floor or ceil of total*share, the counts sum to
    ``total``, and over uniform ``u`` each count's mean is exactly total*share."""
    s = float(sum(mix))
    if total < 0 or len(mix) != len(KINDS) or s <= 0 or min(mix) < 0:
        raise ValueError(f"bad total {total} or mix {list(mix)}")
    counts, cum, prev = {}, 0.0, 0
    for kind, share in zip(KINDS, mix, strict=True):
        cum += total * share / s
        upto = min(total, math.floor(cum + u + 1e-9))
        counts[kind] = upto - prev
        prev = upto
    counts[KINDS[0]] += total - prev  # float slack lands on online
    return counts


def _candidates(
    kind: str, request: str, demo: str, buffer: ReplayBuffer, current_round: int
) -> list[Pair]:
    if kind == "online":
        return [
            Pair(request, demo, s.text, kind, DEMO_ROUND, s.round)
            for s in buffer.of(request, round=current_round)
        ]
    if kind == "replay":
        return [
            Pair(request, demo, s.text, kind, DEMO_ROUND, s.round)
            for s in buffer.of(request, before=current_round)
        ]
    # intermodel: a later round's sample over an earlier round's, later <= current
    pool = [s for s in buffer.of(request) if s.round <= current_round]
    return [
        Pair(request, a.text, b.text, kind, a.round, b.round)
        for a in pool
        for b in pool
        if a.round > b.round
    ]


def draw_pairs(
    demos: Sequence[dict[str, str]],
    buffer: ReplayBuffer,
    current_round: int,
    n_pairs: int,
    mix: Sequence[float],
    rng: random.Random,
    *,
    replay: bool = True,
    intermodel: bool = True,
) -> tuple[list[Pair], dict[str, int]]:
    """``n_pairs`` pairs for the batch of ``demos`` (the training demonstrations of this step)
    at round ``current_round``. Returns the pairs and the count of each kind actually used.

    Only ``demos`` and the buffer's samples of their requests are ever paired, each pair
    within one request; samples of requests not in ``demos`` are ignored."""
    if n_pairs <= 0:
        return [], dict.fromkeys(KINDS, 0)
    by_request: dict[str, str] = {}
    for d in demos:
        by_request.setdefault(d["input"], d["output"])
    enabled = {"online": True, "replay": replay, "intermodel": intermodel}
    pools = {
        kind: [
            p
            for req, demo in by_request.items()
            for p in _candidates(kind, req, demo, buffer, current_round)
        ]
        if enabled[kind]
        else []
        for kind in KINDS
    }
    if not pools["online"]:
        raise ValueError(
            f"no samples of round {current_round} for these requests: cannot build online pairs"
        )
    want = type_counts(n_pairs, mix, rng.random())
    used: dict[str, list[Pair]] = {}
    shortfall = 0
    for kind in ("replay", "intermodel"):
        k = min(want[kind], len(pools[kind]))
        used[kind] = rng.sample(pools[kind], k)
        shortfall += want[kind] - k
    n_online = want["online"] + shortfall
    online = rng.sample(pools["online"], min(n_online, len(pools["online"])))
    while len(online) < n_online:  # the online pool itself is short: draw it again
        online.append(rng.choice(pools["online"]))
    used["online"] = online
    pairs = [p for kind in KINDS for p in used[kind]]
    return pairs, {kind: len(used[kind]) for kind in KINDS}


def batch_requests(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the demonstrations in DPO step ``step``'s batch: seeded shuffles laid end to
    end (the same on resume), ``min(batch_size, n)`` distinct ones per step when possible."""
    b = min(batch_size, n)
    out = []
    for pos in range(step * b, step * b + b):
        epoch, k = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(order[k])
    return out
