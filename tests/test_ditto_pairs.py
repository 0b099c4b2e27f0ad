"""DITTO's pair mixer and replay buffer (pure: no model)."""

from __future__ import annotations

import random

import pytest

from engine.stages.ditto_pairs import (
    DEMO_ROUND,
    KINDS,
    ReplayBuffer,
    Sample,
    batch_requests,
    draw_pairs,
    type_counts,
)
from engine.store.split import split_demos

DEMOS = [{"input": f"request {i}", "output": f"demo text {i}"} for i in range(10)]


def buffer_with(rounds: int, per: int = 5, demos=DEMOS) -> ReplayBuffer:
    buf = ReplayBuffer()
    for r in range(1, rounds + 1):
        ckpt = "sft-init" if r == 1 else f"round-{r - 1}"
        for d in demos:
            buf.add(Sample(d["input"], r, ckpt, f"{d['input']} / r{r} s{k}") for k in range(per))
    return buf


def owner(text: str) -> str:
    """The request a text belongs to (demo or sample), by construction of the fixtures."""
    if text.startswith("demo text "):
        return "request " + text.removeprefix("demo text ")
    return text.split(" / ")[0]


def test_type_counts_sum_and_mean():
    for total in (1, 5, 8, 24):
        sums = dict.fromkeys(KINDS, 0)
        n = 4000
        for i in range(n):
            c = type_counts(total, (0.7, 0.2, 0.1), (i + 0.5) / n)
            assert sum(c.values()) == total
            for k, share in zip(KINDS, (0.7, 0.2, 0.1), strict=True):
                assert abs(c[k] - total * share) < 1 + 1e-9  # floor or ceil
                sums[k] += c[k]
        for k, share in zip(KINDS, (0.7, 0.2, 0.1), strict=True):
            assert abs(sums[k] / (n * total) - share) < 0.005


def test_proportions_over_many_draws():
    buf = buffer_with(3)
    rng = random.Random(0)
    totals = dict.fromkeys(KINDS, 0)
    for step in range(600):
        batch = [DEMOS[i] for i in batch_requests(step, len(DEMOS), 4, 0)]
        pairs, counts = draw_pairs(batch, buf, 3, 8, (0.7, 0.2, 0.1), rng)
        assert len(pairs) == 8 and sum(counts.values()) == 8
        assert counts == {k: sum(p.kind == k for p in pairs) for k in KINDS}
        for k in KINDS:
            totals[k] += counts[k]
    n = sum(totals.values())
    for k, share in zip(KINDS, (0.7, 0.2, 0.1), strict=True):
        assert abs(totals[k] / n - share) < 0.02, totals


def test_pair_kinds_have_the_right_rounds():
    buf = buffer_with(3)
    pairs, _ = draw_pairs(DEMOS, buf, 3, 300, (0.4, 0.3, 0.3), random.Random(1))
    for p in pairs:
        if p.kind == "online":
            assert p.chosen_round == DEMO_ROUND and p.rejected_round == 3
            assert p.chosen.startswith("demo text")
        elif p.kind == "replay":
            assert p.chosen_round == DEMO_ROUND and p.rejected_round in (1, 2)
        else:
            assert 1 <= p.rejected_round < p.chosen_round <= 3
            assert not p.chosen.startswith("demo text")


def test_round_one_falls_back_to_online():
    buf = buffer_with(1)
    pairs, counts = draw_pairs(DEMOS[:4], buf, 1, 8, (0.7, 0.2, 0.1), random.Random(0))
    assert counts == {"online": 8, "replay": 0, "intermodel": 0}
    assert all(p.kind == "online" for p in pairs)


def test_switches_off_fall_back_to_online():
    buf = buffer_with(3)
    rng = random.Random(0)
    for _ in range(50):
        _, c = draw_pairs(DEMOS[:4], buf, 3, 8, (0.7, 0.2, 0.1), rng, replay=False)
        assert c["replay"] == 0 and c["online"] + c["intermodel"] == 8
        _, c = draw_pairs(DEMOS[:4], buf, 3, 8, (0.7, 0.2, 0.1), rng, intermodel=False)
        assert c["intermodel"] == 0 and c["online"] + c["replay"] == 8
        _, c = draw_pairs(
            DEMOS[:4], buf, 3, 8, (0.7, 0.2, 0.1), rng, replay=False, intermodel=False
        )
        assert c == {"online": 8, "replay": 0, "intermodel": 0}


def test_short_pools_fall_back_and_online_repeats_when_it_must():
    # one request, one sample per round: 1 online, 1 replay, 1 intermodel candidate at round 2
    buf = buffer_with(2, per=1, demos=DEMOS[:1])
    pairs, c = draw_pairs(DEMOS[:1], buf, 2, 10, (0.1, 0.45, 0.45), random.Random(0))
    assert c == {"online": 8, "replay": 1, "intermodel": 1} and len(pairs) == 10
    with pytest.raises(ValueError, match="no samples of round 3"):
        draw_pairs(DEMOS[:1], buf, 3, 4, (0.7, 0.2, 0.1), random.Random(0))


def test_never_pairs_across_requests():
    buf = buffer_with(3)
    rng = random.Random(3)
    for step in range(200):
        batch = [DEMOS[i] for i in batch_requests(step, len(DEMOS), 4, 1)]
        pairs, _ = draw_pairs(batch, buf, 3, 12, (0.5, 0.25, 0.25), rng)
        allowed = {d["input"] for d in batch}
        for p in pairs:
            assert p.request in allowed
            assert owner(p.chosen) == p.request and owner(p.rejected) == p.request


def test_held_out_demonstrations_never_appear():
    split = split_demos(DEMOS, 2, 0, None)
    held = {d["input"] for d in split.holdout} | {d["output"] for d in split.holdout}
    assert len(split.holdout) == 2
    # the buffer holds samples of every request (as if a bug had sampled held-out ones too):
    # only the training demonstrations given to the mixer are paired
    buf = buffer_with(3)
    rng = random.Random(0)
    for step in range(200):
        batch = [split.train[i] for i in batch_requests(step, len(split.train), 4, 0)]
        pairs, _ = draw_pairs(batch, buf, 3, 12, (0.7, 0.2, 0.1), rng)
        for p in pairs:
            assert p.request not in held and p.chosen not in held
            assert owner(p.rejected) not in held


def test_batches_are_deterministic_and_cover_the_demos():
    a = [batch_requests(s, 8, 4, 0) for s in range(4)]
    assert a == [batch_requests(s, 8, 4, 0) for s in range(4)]
    assert all(len(set(b)) == 4 for b in a)
    assert sorted(a[0] + a[1]) == list(range(8))  # one epoch = two batches
    assert batch_requests(0, 3, 8, 0) == batch_requests(0, 3, 3, 0)


def test_buffer_round_trip_and_keep(tmp_path):
    buf = buffer_with(2, per=2)
    buf.meta["fingerprint"] = "abc"
    path = buf.save(tmp_path / "b.json")
    back = ReplayBuffer.load(path)
    assert back.samples == buf.samples and back.meta == {"fingerprint": "abc"}
    assert back.rounds() == [1, 2]
    dropped = back.keep(lambda s: s.round == 1)
    assert dropped == 20 and back.rounds() == [1]
    with pytest.raises(ValueError):
        ReplayBuffer.from_json({"nope": 1})
