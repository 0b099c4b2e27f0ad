"""engine/llm/judge.py: rendering, verdict parsing, sign convention, position swap, tournaments."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import tinker

from engine.llm import judge as J
from engine.llm.judge import (
    PREFER_A,
    PREFER_B,
    TIE,
    Comparison,
    Judge,
    JudgeStats,
    RuleJudge,
    Verdict,
    combine_orders,
    format_instruction,
    group_advantages,
    has_zero_variance,
    matchups,
    parse_verdict,
    render_prompt_text,
    tournament_rewards,
    training_target,
)
from tests.conftest import TINY, needs_backend

CORPUS = Path(__file__).parent / "data" / "judge_outputs" / "corpus.jsonl"

CONVO = [
    {"role": "system", "content": "You write exactly like Alex: short, warm, no fluff."},
    {"role": "user", "content": "Write to Dr. Lee to move my cleaning to next week."},
]
RUBRIC = "[Does the response sound like the writer?]\nScore 1: Not at all.\nScore 5: Exactly."


def comparison(a: str = "Hi Dr. Lee, can we move it? Thanks!", b: str = "Dear Sir, ...", **kw):
    return Comparison(CONVO, a, b, RUBRIC, **kw)


# --------------------------------------------------------------------------- parsing


def corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def test_corpus_is_big_and_messy_enough():
    rows = corpus()
    assert len(rows) >= 15
    assert {r["expected"] for r in rows} == {"A", "B", "unparsable"}
    assert sum(r["expected"] == "unparsable" for r in rows) >= 5


@pytest.mark.parametrize("row", corpus(), ids=lambda r: r["note"])
def test_parse_real_judge_outputs(row):
    assert parse_verdict(row["text"]) == Verdict(row["expected"])


@pytest.mark.parametrize("junk", [None, "", "   ", "\x00\x01", "[" * 5000, "🙂" * 100, 42])
def test_parse_never_raises(junk):
    assert parse_verdict(junk) is Verdict.UNPARSABLE


# --------------------------------------------------------------------------- sign convention


def test_sign_convention_is_written_once():
    assert (PREFER_A, PREFER_B, TIE) == (1, -1, 0)
    assert Verdict.A.preference == PREFER_A
    assert Verdict.B.preference == PREFER_B
    assert Verdict.UNPARSABLE.preference == TIE
    assert Verdict.from_preference(1) is Verdict.A and Verdict.from_preference(-1) is Verdict.B
    assert "preference = 1" in J.__doc__ and "A, the first completion" in J.__doc__


@pytest.mark.parametrize("mode", ["feedback", "verdict"])
@pytest.mark.parametrize("preference", [PREFER_A, PREFER_B])
def test_training_target_round_trips_through_the_parser(mode, preference):
    target = training_target(comparison(), preference, "Response X is warmer.", mode=mode)
    assert parse_verdict(target).preference == preference
    if mode == "verdict":
        assert target in ("[RESULT] A", "[RESULT] B")
    else:
        assert target.startswith("Response X is warmer.") and J.feedback_text(target) == (
            "Response X is warmer."
        )


def test_training_target_without_feedback_and_for_a_tie():
    target = training_target(comparison(), PREFER_B, None, mode="feedback")
    assert target.endswith("[RESULT] B") and len(target) > len("[RESULT] B")
    with pytest.raises(ValueError):
        training_target(comparison(), TIE)


def test_combine_orders():
    # ab: A preferred; ba (swapped): B preferred, i.e. the original A again.
    assert combine_orders(Verdict.A, Verdict.B) == PREFER_A
    assert combine_orders(Verdict.B, Verdict.A) == PREFER_B
    # Position bias: "first" both times is a disagreement: a tie.
    assert combine_orders(Verdict.A, Verdict.A) == TIE
    assert combine_orders(Verdict.B, Verdict.B) == TIE
    assert combine_orders(Verdict.A, Verdict.UNPARSABLE) == TIE
    assert combine_orders(Verdict.UNPARSABLE, Verdict.UNPARSABLE) == TIE


def test_stats_tally():
    stats = JudgeStats()
    for ab, ba in [
        (Verdict.A, Verdict.B),  # consistent, A
        (Verdict.B, Verdict.A),  # consistent, B
        (Verdict.A, Verdict.A),  # inconsistent: tie
        (Verdict.UNPARSABLE, Verdict.B),  # one unparsable: tie
    ]:
        stats.add(combine_orders(ab, ba), ab, ba)
    assert (stats.comparisons, stats.answers, stats.unparsable) == (4, 8, 1)
    assert stats.unparsable_rate == 1 / 8
    assert (stats.both_parsed, stats.consistent) == (3, 2)
    assert stats.consistency_rate == 2 / 3
    assert stats.first_position_rate == 4 / 7
    assert (stats.wins_a, stats.wins_b, stats.ties) == (1, 1, 2)
    assert JudgeStats().consistency_rate is None and JudgeStats().unparsable_rate == 0.0


# --------------------------------------------------------------------------- rendering


def test_instruction_drops_system_and_keeps_turns():
    convo = [
        *CONVO,
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Shorter."},
    ]
    text = format_instruction(convo)
    assert text.splitlines() == [
        "user: Write to Dr. Lee to move my cleaning to next week.",
        "assistant: Sure.",
        "user: Shorter.",
    ]
    assert "Alex" not in text


@pytest.mark.parametrize("mode", ["feedback", "verdict"])
def test_render_has_the_prometheus_sections_in_order(mode):
    text = render_prompt_text(comparison(reference="Hi Dr Lee! Next week? Alex"), mode)
    positions = [text.index(h) for h in J.HEADERS]
    assert positions == sorted(positions)
    assert text.startswith("###Task Description:\n")
    assert text.endswith("###Feedback: ")
    assert "a reference answer" in text
    assert "Hi Dr Lee! Next week? Alex" in text
    assert "###Instruction:\nuser: Write to Dr. Lee" in text
    assert "You write exactly like Alex" not in text  # no system prompt in the instruction
    assert "[RESULT] (A or B)" in text
    assert ("Write a detailed feedback" in text) == (mode == "feedback")


def test_render_without_reference():
    text = render_prompt_text(comparison(), "feedback")
    assert "###Reference Answer" not in text and "a reference answer" not in text
    assert (
        text.index("###Response B:") < text.index("###Score Rubric:") < text.index("###Feedback:")
    )


def test_messages_and_swap():
    c = comparison()
    messages = J.judge_messages(c, "verdict")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == J.SYSTEM_PROMPT
    s = c.swap()
    assert (s.completion_a, s.completion_b) == (c.completion_b, c.completion_a)
    assert s.swap() == c
    with pytest.raises(ValueError):
        render_prompt_text(c, "essay")  # type: ignore[arg-type]


@needs_backend
def test_build_prompt_through_the_judge_renderer():
    from transformers import AutoTokenizer

    from engine.backends.local import ensure_model_dir
    from engine.backends.renderers import get_renderer_for

    tokenizer = AutoTokenizer.from_pretrained(ensure_model_dir(TINY))
    renderer = get_renderer_for(TINY, tokenizer)
    model_input = J.build_judge_prompt(renderer, comparison(), "verdict")
    text = tokenizer.decode(model_input.to_ints())
    assert J.SYSTEM_PROMPT in text and "###Response A:" in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    # Training conversation = the same prompt + the target.
    sup, weights = renderer.build_supervised_example(
        J.training_messages(comparison(), PREFER_A, mode="verdict")
    )
    assert sup.to_ints()[: model_input.length] == model_input.to_ints()
    assert tokenizer.decode(
        [t for t, w in zip(sup.to_ints(), weights.tolist(), strict=True) if w]
    ).startswith("[RESULT] A")


# --------------------------------------------------------------------------- tournaments


def test_matchups_chunk_like_the_cookbook():
    assert matchups(3) == [(0, 1), (0, 2), (1, 2)]
    assert matchups(6, chunk_size=4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (4, 5)]
    assert matchups(8, chunk_size=2) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert len(matchups(16, chunk_size=4)) == 4 * 6  # linear in n
    assert matchups(1) == [] and matchups(0) == []


def test_tournament_rewards_by_hand():
    # 0 beats 1 and 2, ties 3; 2 beats 1 and 3; 3 beats 1.
    results = [(0, 1, 1), (0, 2, 1), (0, 3, 0), (1, 2, -1), (1, 3, -1), (2, 3, 1)]
    rewards = tournament_rewards(4, results)
    assert rewards == pytest.approx([2 / 3, -1.0, 1 / 3, 0.0])
    assert group_advantages(rewards) == pytest.approx([2 / 3, -1.0, 1 / 3, 0.0])  # mean 0
    penalised = tournament_rewards(
        4, results, stopped=[True, True, False, True], format_penalty=1.0
    )
    assert penalised == pytest.approx([2 / 3, -1.0, -2 / 3, 0.0])
    assert group_advantages(penalised) == pytest.approx(
        [11 / 12, -3 / 4, -5 / 12, 1 / 4]
    )  # mean -1/4
    assert tournament_rewards(3, [(0, 1, 1)]) == [1.0, -1.0, 0.0]  # no match: 0
    with pytest.raises(ValueError):
        tournament_rewards(2, [], stopped=[True])


def test_zero_variance_groups():
    assert has_zero_variance([0.0, 0.0, 0.0])
    assert has_zero_variance([])
    assert not has_zero_variance([0.0, 1.0])
    assert tournament_rewards(2, [(0, 1, TIE)]) == [0.0, 0.0]


async def test_rule_judge_tournament_prefers_shorter():
    group = ["the longest one of them all", "short", "a bit longer"]
    judge = RuleJudge()
    pairs = matchups(len(group))
    records = await judge.judge([Comparison(CONVO, group[i], group[j], RUBRIC) for i, j in pairs])
    rewards = tournament_rewards(
        len(group), [(i, j, r.preference) for (i, j), r in zip(pairs, records, strict=True)]
    )
    assert rewards == pytest.approx([-1.0, 1.0, 0.0])
    assert all(r.consistent for r in records)
    assert judge.stats.consistency_rate == 1.0 and judge.stats.unparsable == 0
    tie = await judge.judge_one(Comparison(CONVO, "same", "same", RUBRIC))
    assert tie.preference == TIE and not tie.consistent


# --------------------------------------------------------------------------- the async Judge


class ScriptedClient:
    """A sampling client answering from a script by call index (an Exception fails the call)."""

    def __init__(self, answers):
        self.answers = answers  # callable(call_index) -> str | Exception
        self.calls = 0

    def sample(self, prompt, num_samples, sampling_params):
        assert isinstance(prompt, tinker.ModelInput) and num_samples == 1
        index = self.calls
        self.calls += 1
        fut = asyncio.get_running_loop().create_future()
        answer = self.answers(index)
        if isinstance(answer, Exception):
            fut.set_exception(answer)
        else:
            fut.set_result(
                SimpleNamespace(sequences=[SimpleNamespace(tokens=[index], stop_reason="stop")])
            )
        return fut


class ScriptedSampler:
    def __init__(self, answers):
        self.client = ScriptedClient(answers)
        self.texts = answers
        self.renderer = SimpleNamespace(
            build_generation_prompt=lambda messages: tinker.ModelInput.from_ints([1, 2, 3]),
            get_stop_sequences=lambda: [2],
        )
        self.tokenizer = None

    def decode(self, tokens):
        return str(self.texts(tokens[0]))


async def test_judge_pairs_orders_and_pipelines():
    # Calls alternate ab, ba per comparison. Comparison 0: consistent A; 1: position-biased;
    # 2: garbage then B; 3: request failure.
    script = ["[RESULT] A", "[RESULT] B", "[RESULT] A", "[RESULT] A", "lorem ipsum", "[RESULT] B"]
    script += [RuntimeError("boom"), "[RESULT] B"]
    sampler = ScriptedSampler(lambda i: script[i])
    judge = Judge(sampler, mode="verdict", concurrency=64)
    records = await judge.judge([comparison() for _ in range(4)])
    assert sampler.client.calls == 8 and len(records) == 4
    assert [r.preference for r in records] == [PREFER_A, TIE, TIE, TIE]
    assert [r.consistent for r in records] == [True, False, False, False]
    assert records[2].verdict_ab is Verdict.UNPARSABLE and records[2].text_ab == "lorem ipsum"
    assert records[3].verdict_ab is Verdict.UNPARSABLE and records[3].text_ab == ""
    assert judge.stats.unparsable == 2 and judge.stats.answers == 8
    assert judge.stats.consistency_rate == 1 / 2
    assert json.dumps([r.as_dict() for r in records])  # records serialise
    old = judge.reset_stats()
    assert old.comparisons == 4 and judge.stats.comparisons == 0


async def test_judge_issues_every_request_before_awaiting_any():
    """Pipelining: every request of a batch is out before the first answer comes back."""
    gate = asyncio.Event()

    class SlowClient:
        calls = 0

        def sample(self, prompt, num_samples, sampling_params):
            SlowClient.calls += 1

            async def answer():
                await gate.wait()
                return SimpleNamespace(sequences=[SimpleNamespace(tokens=[0], stop_reason="stop")])

            return asyncio.ensure_future(answer())

    sampler = ScriptedSampler(lambda i: "[RESULT] A")
    sampler.client = SlowClient()
    judge = Judge(sampler, mode="verdict")
    task = asyncio.ensure_future(judge.judge([comparison() for _ in range(5)]))
    for _ in range(3):
        await asyncio.sleep(0)
    issued_before_any_answer = SlowClient.calls
    gate.set()
    records = await task
    assert issued_before_any_answer == 10
    assert len(records) == 5 and SlowClient.calls == 10


@pytest.fixture(scope="module")
def tiny_sampler(tmp_path_factory):
    from engine.backends.local import TINY_MODEL, LocalServiceClient
    from engine.backends.renderers import get_renderer_for
    from engine.llm.sampling import Sampler

    svc = LocalServiceClient(tmp_path_factory.mktemp("judge-ckpt"), device="cpu", dtype="float32")
    client = svc.create_sampling_client(base_model=TINY_MODEL).result()
    tokenizer = client.get_tokenizer()
    yield Sampler(
        client=client,
        renderer=get_renderer_for(TINY_MODEL, tokenizer),
        tokenizer=tokenizer,
        model=TINY_MODEL,
    )
    svc.close()


@needs_backend
async def test_judge_end_to_end_on_the_tiny_model(tiny_sampler):
    judge = Judge(
        tiny_sampler, mode="verdict", max_tokens=6, temperature=1.0, seed=3, verdict_by="sample"
    )
    comparisons = [
        comparison(),
        comparison("Thanks!", "Thank you very much for everything.", reference="Thx! Alex"),
        comparison("Yes.", "No."),
    ]
    records = await judge.judge(comparisons)
    assert len(records) == 3
    for r in records:
        assert r.preference in (PREFER_A, PREFER_B, TIE)
        assert isinstance(r.text_ab, str) and isinstance(r.text_ba, str)
        assert r.verdict_ab is parse_verdict(r.text_ab) and r.verdict_ba is parse_verdict(r.text_ba)
    unparsable = sum(r.unparsable for r in records)
    assert judge.stats.answers == 6 and judge.stats.unparsable == unparsable
    assert unparsable > 0  # the random model writes garbage: counted, scored as ties
    assert 0.0 <= judge.stats.unparsable_rate <= 1.0


@needs_backend
async def test_verdict_by_logprobs_is_the_forced_choice(tiny_sampler):
    """Verdict mode on a client that can score: every answer parses, and the verdict is the
    one of "[RESULT] A" / "[RESULT] B" with the higher log-probability, computed here by hand."""
    from engine.llm.judge import build_judge_prompt, verdict_text

    judge = Judge(tiny_sampler, mode="verdict")
    assert judge.verdict_by == "logprobs"
    comparisons = [comparison(), comparison("Yes.", "No.", reference="Yes! Alex")]
    records = await judge.judge(comparisons)
    assert judge.stats.unparsable == 0 and judge.stats.answers == 4
    for c, r in zip(comparisons, records, strict=True):
        for cmp, verdict in ((c, r.verdict_ab), (c.swap(), r.verdict_ba)):
            prompt = build_judge_prompt(tiny_sampler.renderer, cmp, "verdict").to_ints()
            scores = []
            for pref in (PREFER_A, PREFER_B):
                target = tiny_sampler.tokenizer.encode(verdict_text(pref), add_special_tokens=False)
                lps = await tiny_sampler.client.compute_logprobs(
                    tinker.ModelInput.from_ints(prompt + target)
                )
                scores.append(sum(lps[-len(target) :]))
            want = Verdict.A if scores[0] > scores[1] else Verdict.B
            assert verdict is want
        # both orders' margins are kept, and the verdict is the calibrated one
        assert r.combined_by == "calibrated" and r.margin_ab is not None
        assert r.s == pytest.approx((r.margin_ab - r.margin_ba) / 2)
        assert r.bias == pytest.approx((r.margin_ab + r.margin_ba) / 2)
        assert r.preference == J.combine_margins(r.margin_ab, r.margin_ba)
        assert {"m_ab", "m_ba", "s", "b", "combined_by"} <= set(r.as_dict())


async def test_a_judge_whose_every_request_fails_raises():
    """A dead service must not look like a run of ties."""
    from engine.llm.judge import JudgeUnavailable

    sampler = ScriptedSampler(lambda i: RuntimeError("connection refused"))
    judge = Judge(sampler, mode="verdict")
    with pytest.raises(JudgeUnavailable, match="connection refused"):
        await judge.judge([comparison(), comparison()])


# --------------------------------------------------------------------------- calibration


PAIRS = [("short", "a much longer answer"), ("a longer one", "tiny"), ("same", "also"), ("x", "yy")]


@pytest.mark.parametrize("bias", [3.0, -2.5, 0.0])
async def test_calibration_recovers_the_signal_under_a_constant_slot_bias(bias):
    """A judge with a slot bias larger than its signal: the calibrated rule recovers the
    signal exactly (s = ±strength, b = the bias); the agreement rule ties every biased one."""
    comps = [comparison(a, b) for a, b in PAIRS]
    want = [PREFER_A, PREFER_B, TIE, PREFER_A]  # the shorter wins; equal lengths tie
    calibrated = RuleJudge(slot_bias=bias, strength=0.5)
    records = await calibrated.judge(comps)
    assert [r.preference for r in records] == want
    assert [r.s for r in records] == [0.5, -0.5, 0.0, 0.5]
    assert all(r.bias == bias and r.combined_by == "calibrated" for r in records)
    assert calibrated.stats.mean_position_bias == bias
    assert calibrated.stats.decided_share == 3 / 4
    agree = RuleJudge(slot_bias=bias, strength=0.5, combine="agree")
    got = [r.preference for r in await agree.judge(comps)]
    if bias:  # every answer names the first slot: the orders never agree
        assert got == [TIE] * 4 and agree.stats.decided_share == 0.0
        assert agree.stats.consistency_rate == 0.0
    else:
        assert got == want


@pytest.mark.parametrize("combine", ["calibrated", "agree"])
async def test_a_judge_without_signal_ties_under_both_rules(combine):
    judge = RuleJudge(slot_bias=3.0, strength=0.0, combine=combine)
    records = await judge.judge([comparison(a, b) for a, b in PAIRS])
    assert [r.preference for r in records] == [TIE] * 4
    assert judge.stats.decided_share == 0.0 and judge.stats.mean_position_bias == 3.0


def test_combine_margins_by_hand():
    assert J.balanced(-10.8 + 14.2, -11.0 + 14.0) == pytest.approx((0.2, 3.2))
    assert J.combine_margins(3.4, 3.0) == PREFER_A  # s = 0.2: A, despite "A" in both orders
    assert J.combine_margins(3.0, 3.4) == PREFER_B
    assert J.combine_margins(3.0, 3.02) == TIE  # |s| = 0.01 < the default tie margin
    assert J.combine_margins(3.0, 3.02, tie_margin=0.0) == PREFER_B
    assert J.combine_margins(1.0, 1.0, tie_margin=0.0) == TIE


def test_sampled_verdicts_fall_back_to_agreement_and_say_so():
    r = J.make_record("[RESULT] A", "[RESULT] A")  # no margins: a sampled verdict
    assert r.preference == TIE and r.combined_by == "agree" and r.s is None
    r = J.make_record("[RESULT] A", "[RESULT] B")
    assert r.preference == PREFER_A and r.combined_by == "agree"
    r = J.make_record("x", "y", Verdict.A, Verdict.A, margin_ab=3.0, margin_ba=2.0)
    assert r.preference == PREFER_A and r.combined_by == "calibrated"
    r = J.make_record("x", "y", Verdict.A, Verdict.A, margin_ab=3.0, margin_ba=2.0, combine="agree")
    assert r.preference == TIE and r.combined_by == "agree" and r.s == 0.5
    with pytest.raises(ValueError, match="combine"):
        J.make_record("x", "y", combine="vote")


def test_margin_rewards_by_hand():
    # 0 beats 1 by 0.5 nats, 2 beats 0 by 3 nats (clipped to 1), 1 and 2 tie
    rewards = J.margin_rewards(3, [(0, 1, 0.5), (2, 0, 3.0), (1, 2, 0.0)])
    assert rewards == pytest.approx([(0.5 - 1.0) / 2, (-0.5 + 0.0) / 2, (1.0 + 0.0) / 2])
    stopped = J.margin_rewards(2, [(0, 1, 0.25)], stopped=[True, False], format_penalty=1.0)
    assert stopped == pytest.approx([0.25, -1.25])


async def test_person_accuracy_and_plain_warnings():
    from engine.eval import judge_trust as T

    """Known answers: the person's text (short) should beat a model's (long). A judge
    preferring shorter gets them all right; one with no signal is at chance, and the
    warnings say in words that it cannot tell the person's writing from the model's."""
    mine, theirs = "Hi Jo, thanks!", "Dear Jo, I am writing to express my sincere gratitude."
    cases = {"vs_base": [(CONVO, mine, theirs)] * 6, "vs_few_shot": [], "seen_in_training": []}
    good, stats = await T.person_accuracy(RuleJudge(slot_bias=2.0), cases, RUBRIC)
    assert set(good) == {"vs_base"} and good["vs_base"]["value"] == 1.0
    assert good["vs_base"]["n"] == 6 and good["vs_base"]["ci"][0] > 0.5
    assert stats["decided_share"] == 1.0 and stats["mean_position_bias"] == 2.0
    assert len(good["vs_base"]["s"]) == 6 and min(good["vs_base"]["s"]) > 0
    assert T.judge_warnings(stats, good) == []
    blind, stats = await T.person_accuracy(RuleJudge(slot_bias=2.0, strength=0.0), cases, RUBRIC)
    assert blind["vs_base"]["value"] == 0.5 and blind["vs_base"]["ties"] == 6
    words = " ".join(T.judge_warnings(stats, blind))
    assert "decided 0 of 6 comparisons" in words
    assert "cannot tell your writing from the base model's samples" in words
    assert "should not be trusted" in words
    worse = {"vs_base": {"value": 0.1, "n": 20, "ci": [0.03, 0.3]}}
    assert "prefers the base model's samples to your own text" in T.judge_warnings({}, worse)[0]


def test_tie_margin_sweep_recombines_kept_margins_by_hand():
    """Held-out s values (the person's text as A; ties count half). Margin 0 decides all six
    (3 right, 3 wrong: 50%); 0.1 ties the two tiny wrong ones (3 right, 1 wrong, 2 ties:
    4/6); 0.25 also ties a right one (2, 1, 3: 3.5/6); 1.0 also the wrong -0.3 (2, 0, 4:
    4/6); 1.6 leaves only 2.0 decided (1, 0, 5: 3.5/6)."""
    from engine.eval import judge_trust as T

    cells = {
        "vs_base": {"s": [2.0, -0.3, 0.2]},
        "vs_few_shot": {"s": [1.2, -0.06, -0.08]},
        "seen_in_training": {"s": [-5.0]},  # not held out: left out of the sweep
    }
    rows = {r["tie_margin"]: r for r in T.tie_margin_sweep(cells, (0.0, 0.1, 0.25, 1.0, 1.6))}
    expect = {
        0.0: (6, 3 / 6),
        0.1: (4, 4 / 6),
        0.25: (3, 3.5 / 6),
        1.0: (2, 4 / 6),
        1.6: (1, 3.5 / 6),
    }
    for t, (decided, accuracy) in expect.items():
        assert rows[t]["decided_share"] == pytest.approx(decided / 6), t
        assert rows[t]["accuracy"] == pytest.approx(accuracy), t
        assert rows[t]["n"] == 6
    assert T.tie_margin_sweep({"vs_base": {"value": 1.0, "n": 3}}) == []
