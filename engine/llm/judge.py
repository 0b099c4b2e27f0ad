"""The rubric-grounded pairwise judge: render, parse, position swap, sign, tournaments.

Sign convention (the one used everywhere in Persona, files included)
--------------------------------------------------------------------
``preference = 1`` (:data:`PREFER_A`) means **A, the first completion**, is preferred;
``preference = -1`` (:data:`PREFER_B`) means B, the second; ``preference = 0``
(:data:`TIE`) means a tie, a disagreement between the two orders, or an unparsable
verdict. This is the course notebook's convention (``[RESULT] A`` -> 1). Note that
tinker-cookbook's preference models use the opposite sign (their score is the reward of
B); convert at that boundary, never inside Persona.

Prompt
------
A :class:`Comparison` renders to the Prometheus-2 relative-grading prompt (the wording of
prometheus-eval's ``RELATIVE_PROMPT`` / ``RELATIVE_PROMPT_WO_REF``) as one user message after
Prometheus' relative system prompt, then through the judge model's cookbook renderer, so
the same comparison is the same tokens on both backends. Two output modes:

- ``"feedback"``: the judge writes feedback, then ``[RESULT] A`` or ``[RESULT] B``
  (Prometheus' own format; the default on Tinker);
- ``"verdict"``: only ``[RESULT] A`` / ``[RESULT] B`` (the default locally, where a 135M
  model's feedback is slow and useless). Where the client can score (``compute_logprobs``,
  both backends), the verdict is the forced choice between the two by their
  log-probabilities, so every answer parses; otherwise it is sampled, a few tokens.

Position bias
-------------
Each comparison is judged in both orders (A,B) and (B,A). Where the judge scores the two
verdicts by log-probability, m_AB = log p("[RESULT] A") - log p("[RESULT] B") with the pair
shown as (A, B), and m_BA the same margin with the pair swapped. The **position-balanced
preference** is s = (m_AB - m_BA) / 2 (positive: A, the first completion of the original
order, is preferred, the same sign as ``preference``); the **position bias** is
b = (m_AB + m_BA) / 2 (positive: the judge favours whichever answer is shown first). A
constant preference for a slot cancels exactly in s (the balanced position calibration of
Wang et al., 2023). :func:`combine_margins` turns s into a preference (a tie only when
|s| < ``tie_margin`` nats): ``combine = "calibrated"``. Where there are no margins (a sampled
verdict), or with ``combine = "agree"``, :func:`combine_orders` applies MT-Bench's rule:
both orders must name the same completion, anything else is a tie. Every record says which
rule decided it (``combined_by``). :class:`JudgeStats` counts the share decided, the mean
position bias, position consistency and the unparsable rate, to report wherever the judge
is used.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

import tinker

from engine.errors import PersonaError

logger = logging.getLogger(__name__)

PREFER_A = 1
PREFER_B = -1
TIE = 0

JudgeMode = Literal["feedback", "verdict"]
JUDGE_MODES: tuple[str, ...] = ("feedback", "verdict")
COMBINE_RULES: tuple[str, ...] = ("calibrated", "agree")
# |s| below this many nats is a tie under the calibrated rule. In bf16 the verdict logits
# come in steps, so s does too: 1/32 nat for SmolLM2 on the example data, where the base
# judge (at chance) gives |s| of 0 to 1/8 nat. Measured with the judge trained at the local defaults
# (tie_margin_sweep over its 16 held-out comparisons): margin 0 or 0.05 decides 88% at 94%
# accuracy, 0.1 decides 81% at 91%, 0.25 decides 25% at 62%; so 0.05, which ties only s of
# 0 and one step, and also keeps a float32 judge's exact indifference (a forward pass differs
# by ~1e-4 between batch shapes) a tie (reward_model.tie_margin).
DEFAULT_TIE_MARGIN = 0.05

# prometheus-eval's REL_SYSTEM_PROMPT.
SYSTEM_PROMPT = (
    "You are a fair judge assistant assigned to deliver insightful feedback that compares "
    "individual performances, highlighting how each stands relative to others within the "
    "same cohort."
)

# Section headers in the order they appear in the rendered prompt.
HEADERS = (
    "###Task Description:",
    "###Instruction:",
    "###Response A:",
    "###Response B:",
    "###Reference Answer:",
    "###Score Rubric:",
    "###Feedback:",
)

# Default token budgets for the judge's answer in each mode.
DEFAULT_MAX_TOKENS: dict[str, int] = {"feedback": 512, "verdict": 8}


# --------------------------------------------------------------------------- comparison


Message = Mapping[str, Any]


@dataclass(frozen=True)
class Comparison:
    """Two completions of the same prompt conversation, to be judged against a rubric.

    ``reference`` is an optional reference answer (typically the person's own text).
    """

    prompt_conversation: Sequence[Message]
    completion_a: str
    completion_b: str
    rubric: str
    reference: str | None = None

    def swap(self) -> Comparison:
        """The same comparison with A and B exchanged."""
        return replace(self, completion_a=self.completion_b, completion_b=self.completion_a)


def _content_text(message: Message) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if isinstance(part, Mapping) and part.get("type", "text") == "text":
            parts.append(str(part.get("text", "")))
        elif isinstance(part, str):
            parts.append(part)
    return "".join(parts)


def format_instruction(conversation: Sequence[Message]) -> str:
    """The user and assistant turns as ``role: content`` lines; system messages are dropped
    (the judge grades against the rubric, not against the policy's system prompt)."""
    return "\n".join(
        f"{m['role']}: {_content_text(m).strip()}"
        for m in conversation
        if m.get("role") in ("user", "assistant")
    )


# --------------------------------------------------------------------------- rendering


def _task_description(mode: JudgeMode, with_reference: bool) -> str:
    given = (
        "An instruction (might include an Input inside it), a response to evaluate, "
        + ("a reference answer, " if with_reference else "")
        + "and a score rubric representing a evaluation criteria are given."
    )
    if mode == "feedback":
        steps = [
            "Write a detailed feedback that assess the quality of two responses strictly "
            "based on the given score rubric, not evaluating in general.",
            "After writing a feedback, choose a better response between Response A and "
            "Response B. You should refer to the score rubric.",
            'The output format should look as follows: "(write a feedback for criteria) '
            '[RESULT] (A or B)"',
            "Please do not generate any other opening, closing, and explanations.",
        ]
    elif mode == "verdict":
        steps = [
            "Choose a better response between Response A and Response B strictly based on "
            "the given score rubric, not evaluating in general.",
            'The output format should look as follows: "[RESULT] (A or B)"',
            "Please do not generate any feedback, opening, closing, and explanations.",
        ]
    else:
        raise ValueError(f"Unknown judge mode {mode!r}: choose one of {', '.join(JUDGE_MODES)}.")
    return "\n".join([given, *(f"{i}. {s}" for i, s in enumerate(steps, 1))])


def render_prompt_text(comparison: Comparison, mode: JudgeMode = "feedback") -> str:
    """The judge's user message: Prometheus' relative-grading prompt for ``comparison``."""
    with_reference = comparison.reference is not None
    sections = [
        ("###Task Description:", _task_description(mode, with_reference)),
        ("###Instruction:", format_instruction(comparison.prompt_conversation)),
        ("###Response A:", comparison.completion_a.strip()),
        ("###Response B:", comparison.completion_b.strip()),
    ]
    if with_reference:
        sections.append(("###Reference Answer:", (comparison.reference or "").strip()))
    sections.append(("###Score Rubric:", comparison.rubric.strip()))
    body = "\n\n".join(f"{header}\n{text}" for header, text in sections)
    return f"{body}\n\n###Feedback: "


def judge_messages(comparison: Comparison, mode: JudgeMode = "feedback") -> list[dict[str, str]]:
    """The chat messages the judge model sees: Prometheus' system prompt, then the prompt."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": render_prompt_text(comparison, mode)},
    ]


def build_judge_prompt(
    renderer: Any, comparison: Comparison, mode: JudgeMode = "feedback"
) -> tinker.ModelInput:
    """The generation prompt for the judge, through the judge model's cookbook renderer."""
    return renderer.build_generation_prompt(judge_messages(comparison, mode))


def verdict_text(preference: int) -> str:
    """``[RESULT] A`` for :data:`PREFER_A`, ``[RESULT] B`` for :data:`PREFER_B`."""
    if preference == PREFER_A:
        return "[RESULT] A"
    if preference == PREFER_B:
        return "[RESULT] B"
    raise ValueError(
        f"A training target needs a preference of 1 (A) or -1 (B), not {preference!r}."
    )


def training_target(
    comparison: Comparison,
    preference: int,
    feedback: str | None = None,
    mode: JudgeMode = "feedback",
) -> str:
    """The assistant text to train the judge on for ``comparison`` (SFT on the whole target).

    ``verdict`` mode: ``[RESULT] X``. ``feedback`` mode: ``<feedback> [RESULT] X`` (the
    Preference-Collection ``output`` shape); without feedback text a one-line stand-in is
    used so the target keeps the format the prompt asks for. ``comparison`` is the one the
    target answers (see :func:`training_messages` for the whole training conversation).
    """
    verdict = verdict_text(preference)
    if mode == "verdict":
        return verdict
    if mode != "feedback":
        raise ValueError(f"Unknown judge mode {mode!r}: choose one of {', '.join(JUDGE_MODES)}.")
    if not feedback or not feedback.strip():
        better, other = ("A", "B") if preference == PREFER_A else ("B", "A")
        feedback = f"Response {better} follows the score rubric more closely than Response {other}."
    return f"{feedback.strip()} {verdict}"


def training_messages(
    comparison: Comparison,
    preference: int,
    feedback: str | None = None,
    mode: JudgeMode = "feedback",
) -> list[dict[str, str]]:
    """The full conversation for SFT of the judge: prompt messages plus the target."""
    target = training_target(comparison, preference, feedback, mode)
    return [*judge_messages(comparison, mode), {"role": "assistant", "content": target}]


# --------------------------------------------------------------------------- parsing


class Verdict(StrEnum):
    """A parsed judge output. ``.preference`` maps it to the sign convention."""

    A = "A"
    B = "B"
    UNPARSABLE = "unparsable"

    @property
    def preference(self) -> int:
        return {Verdict.A: PREFER_A, Verdict.B: PREFER_B}.get(self, TIE)

    @classmethod
    def from_preference(cls, preference: int) -> Verdict:
        return {PREFER_A: cls.A, PREFER_B: cls.B}.get(preference, cls.UNPARSABLE)


# "[RESULT] A", "[RESULT]: B", "[Result] (A)", "Result: A", "Final verdict: B", "[RESULT] Response A".
# A bare "result" needs a colon so prose ("the end result a reader gets") never matches.
_MARKER = re.compile(
    r"(?:\[\s*result\s*\]\s*[:=\-]?|\bresult\s*[:=]|\b(?:final\s+)?verdict\s*[:=])"
    r"\s*[\(\[\"']?\s*(?:response\s+)?(?P<letter>[ab])\b(?P<rest>[^\n]{0,40})",
    re.IGNORECASE,
)
# Template echoes ("[RESULT] (A or B)") and articles ("Result: a tie") are not verdicts.
_NOT_A_VERDICT_AFTER = re.compile(
    r"^\s*[\)\]\"']?\s*(?:or|/|and|\|)\s*\(?\s*(?:response\s+)?[ab]\b", re.I
)
_ARTICLE_USE = re.compile(r"^\s+(?!is\b|wins\b|because\b|since\b|as\b)[a-z]")

# Whole-sentence natural-language verdicts, used only when no marker is present.
_SENTENCE = re.compile(
    r"^(?:(?:overall|therefore|thus|so|hence|in conclusion|in summary),?\s+)?"
    r"(?:"
    r"i\s+(?:would\s+)?(?:prefer|choose|pick|select)\s+response\s+(?P<x>[ab])"
    r"|response\s+(?P<y>[ab])\s+is\s+(?:clearly\s+|slightly\s+|much\s+|overall\s+)?"
    r"(?:the\s+)?(?:better|preferred|superior|stronger|winner)"
    r"(?:\s+(?:one|response|choice|option))?(?:\s+than\s+response\s+[ab])?(?:\s+overall)?"
    r"|response\s+(?P<z>[ab])\s+wins"
    r")$",
    re.IGNORECASE,
)
_DOUBLE_BRACKETS = re.compile(r"\[\[(?P<letter>[AB])\]\]")  # MT-Bench style "[[A]]"
_BARE_LETTER = re.compile(r"^[\W_]*\(?(?P<letter>[AB])\)?[\W_]*$")


def _clean(text: str) -> str:
    # Markdown emphasis and code marks around the verdict: "**[RESULT]** B", "`A`".
    return re.sub(r"\*+|`+|__+|#+", "", text)


def _marker_verdicts(text: str) -> list[Verdict]:
    found = []
    for m in _MARKER.finditer(text):
        letter, rest = m.group("letter"), m.group("rest")
        if _NOT_A_VERDICT_AFTER.match(rest):
            continue
        if letter == "a" and _ARTICLE_USE.match(rest):
            continue
        found.append(Verdict(letter.upper()))
    return found


def _sentence_verdicts(text: str) -> list[Verdict]:
    found = []
    for sentence in re.split(r"[.!?;\n]+", text):
        m = _SENTENCE.match(sentence.strip().strip(":,-\"' "))
        if m:
            letter = m.group("x") or m.group("y") or m.group("z")
            found.append(Verdict(letter.upper()))
    # Mixed natural-language statements are ambiguous: no verdict.
    return found if len(set(found)) == 1 else []


def parse_verdict(text: str | None) -> Verdict:
    """The judge's verdict in ``text``; :attr:`Verdict.UNPARSABLE` when there is none. Never raises.

    In order: the last explicit marker (``[RESULT] X``, ``Result: X``, ``Verdict: X``, with
    markdown, colons, brackets, trailing text, any case); else the whole answer being a
    single capital letter ``A``/``B`` (verdict mode's short form); else a whole sentence
    such as "Response B is better." when all such sentences agree.
    """
    if not text:
        return Verdict.UNPARSABLE
    try:
        cleaned = _clean(str(text))
        markers = _marker_verdicts(cleaned)
        if markers:
            return markers[-1]
        brackets = _DOUBLE_BRACKETS.findall(cleaned)
        if brackets:
            return Verdict(brackets[-1])
        bare = _BARE_LETTER.match(cleaned.strip())
        if bare:
            return Verdict(bare.group("letter"))
        sentences = _sentence_verdicts(cleaned)
        if sentences:
            return sentences[-1]
    except Exception:  # defensive: a parser bug must never stop a stage
        logger.exception("judge verdict parser failed")
    return Verdict.UNPARSABLE


def feedback_text(text: str) -> str:
    """The feedback part of a judge answer: everything before the last ``[RESULT]``."""
    idx = text.upper().rfind("[RESULT]")
    return (text[:idx] if idx >= 0 else text).strip().removeprefix("Feedback:").strip()


# --------------------------------------------------------------------------- position bias


def combine_orders(verdict_ab: Verdict, verdict_ba: Verdict) -> int:
    """The preference for (A, B) from the verdicts on (A, B) and on the swapped (B, A).

    Both orders must name the same completion; a disagreement, or an unparsable side, is a
    tie.
    """
    first = verdict_ab.preference
    second = -verdict_ba.preference  # in the swapped order, "A" is the original B
    return first if first == second else TIE


def balanced(margin_ab: float, margin_ba: float) -> tuple[float, float]:
    """``(s, b)``: the position-balanced preference and the position bias, in nats."""
    return (margin_ab - margin_ba) / 2.0, (margin_ab + margin_ba) / 2.0


def combine_margins(
    margin_ab: float, margin_ba: float, tie_margin: float = DEFAULT_TIE_MARGIN
) -> int:
    """The preference for (A, B) from both orders' margins: the sign of s, a tie when
    |s| < ``tie_margin``. A constant slot bias cancels."""
    s, _b = balanced(margin_ab, margin_ba)
    if abs(s) < tie_margin or s == 0:
        return TIE
    return PREFER_A if s > 0 else PREFER_B


def is_consistent(verdict_ab: Verdict, verdict_ba: Verdict) -> bool:
    """Both orders parsed and named the same completion."""
    return verdict_ab.preference != TIE and verdict_ab.preference == -verdict_ba.preference


@dataclass
class JudgeStats:
    """Running counts over judged comparisons.

    - ``decided_share``: comparisons with a preference (not a tie) / comparisons;
    - ``mean_position_bias``: mean b (nats) over comparisons with both margins; positive:
      the first-shown answer is favoured (None without margins);
    - ``unparsable_rate``: unparsable answers / answers requested;
    - ``consistency_rate``: comparisons whose two orders agree / comparisons with both
      orders parsed (None until one exists), so it is independent of the unparsable rate;
    - ``first_position_rate``: parsed verdicts naming the first-shown response (0.5 is
      unbiased).
    """

    comparisons: int = 0
    answers: int = 0
    unparsable: int = 0
    both_parsed: int = 0
    consistent: int = 0
    first_position: int = 0
    wins_a: int = 0
    wins_b: int = 0
    ties: int = 0
    with_margins: int = 0
    bias_total: float = 0.0

    def add_answer(self, verdict: Verdict) -> None:
        self.answers += 1
        if verdict is Verdict.UNPARSABLE:
            self.unparsable += 1
        elif verdict is Verdict.A:
            self.first_position += 1

    def add(
        self,
        preference: int,
        verdict_ab: Verdict,
        verdict_ba: Verdict | None,
        bias: float | None = None,
    ) -> None:
        """Count one comparison (its answers included); ``bias``: its b, when it has margins."""
        self.comparisons += 1
        self.add_answer(verdict_ab)
        if verdict_ba is not None:
            self.add_answer(verdict_ba)
            if verdict_ab is not Verdict.UNPARSABLE and verdict_ba is not Verdict.UNPARSABLE:
                self.both_parsed += 1
                self.consistent += int(is_consistent(verdict_ab, verdict_ba))
        if bias is not None:
            self.with_margins += 1
            self.bias_total += bias
        if preference == PREFER_A:
            self.wins_a += 1
        elif preference == PREFER_B:
            self.wins_b += 1
        else:
            self.ties += 1

    def add_record(self, record: JudgeRecord) -> None:
        self.add(record.preference, record.verdict_ab, record.verdict_ba, record.bias)

    @property
    def unparsable_rate(self) -> float:
        return self.unparsable / self.answers if self.answers else 0.0

    @property
    def consistency_rate(self) -> float | None:
        return self.consistent / self.both_parsed if self.both_parsed else None

    @property
    def first_position_rate(self) -> float | None:
        parsed = self.answers - self.unparsable
        return self.first_position / parsed if parsed else None

    @property
    def decided_share(self) -> float | None:
        return (self.wins_a + self.wins_b) / self.comparisons if self.comparisons else None

    @property
    def mean_position_bias(self) -> float | None:
        return self.bias_total / self.with_margins if self.with_margins else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "comparisons": self.comparisons,
            "answers": self.answers,
            "unparsable": self.unparsable,
            "unparsable_rate": self.unparsable_rate,
            "both_parsed": self.both_parsed,
            "consistent": self.consistent,
            "consistency_rate": self.consistency_rate,
            "first_position_rate": self.first_position_rate,
            "wins_a": self.wins_a,
            "wins_b": self.wins_b,
            "ties": self.ties,
            "decided_share": self.decided_share,
            "with_margins": self.with_margins,
            "mean_position_bias": self.mean_position_bias,
        }


# --------------------------------------------------------------------------- tournaments


def matchups(n: int, chunk_size: int = 4) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, to judge in a group of ``n`` completions.

    As tinker-cookbook's ``get_pairs_chunked``: the group is cut into consecutive chunks of
    at most ``chunk_size`` and every pair inside a chunk is a matchup, so the number of
    judge calls grows linearly with ``n``. Each matchup is judged in both orders.
    """
    if chunk_size < 2:
        raise ValueError("chunk_size must be at least 2")
    out: list[tuple[int, int]] = []
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        out.extend((i, j) for i in range(start, end) for j in range(i + 1, end))
    return out


def tournament_rewards(
    n: int,
    results: Sequence[tuple[int, int, int]],
    stopped: Sequence[bool] | None = None,
    format_penalty: float = 1.0,
    graded: bool = False,
) -> list[float]:
    """Reward of each of ``n`` completions from its matchups.

    ``results`` holds ``(i, j, preference)`` with the sign convention (1: ``i`` won).
    reward_k = (wins_k - losses_k) / matches_k (0 with no matches), minus ``format_penalty``
    when ``stopped[k]`` is False (the sample ran out of tokens instead of ending on a stop
    sequence), as tinker-cookbook's pairwise preference groups do.
    """
    score = [0.0] * n
    matches = [0] * n
    for i, j, preference in results:
        if graded:  # an outcome in [-1, 1] (margin_rewards), not a verdict
            sign = float(preference)
        else:
            sign = PREFER_A if preference > 0 else PREFER_B if preference < 0 else TIE
        score[i] += sign
        score[j] -= sign
        matches[i] += 1
        matches[j] += 1
    rewards = [s / m if m else 0.0 for s, m in zip(score, matches, strict=True)]
    if stopped is not None:
        if len(stopped) != n:
            raise ValueError(f"stopped has {len(stopped)} entries for a group of {n}")
        rewards = [
            r - (0.0 if ok else format_penalty) for r, ok in zip(rewards, stopped, strict=True)
        ]
    return rewards


# Calibrated margins are clipped to this many nats before averaging into a reward, so one
# confident matchup cannot outweigh the rest and the scale matches the wins reward ([-1, 1]).
MARGIN_CLIP = 1.0


def margin_rewards(
    n: int,
    results: Sequence[tuple[int, int, float]],
    stopped: Sequence[bool] | None = None,
    format_penalty: float = 1.0,
    clip: float = MARGIN_CLIP,
) -> list[float]:
    """Like :func:`tournament_rewards` with a graded outcome: ``results`` holds
    ``(i, j, s)`` with s the calibrated preference for ``i`` over ``j`` in nats; reward_k is
    the mean of s (clipped to ±``clip``) over k's matches, from k's side. A group ties only
    where the judge is really indifferent."""
    graded = [(i, j, max(-clip, min(clip, s)) / clip) for i, j, s in results]
    return tournament_rewards(n, graded, stopped, format_penalty, graded=True)


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """Group-centred advantages: reward minus the group's mean."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def has_zero_variance(rewards: Sequence[float], tol: float = 1e-9) -> bool:
    """True when every reward in the group is the same (no gradient signal: skip the group)."""
    return not rewards or max(rewards) - min(rewards) <= tol


# --------------------------------------------------------------------------- judges


@dataclass
class JudgeRecord:
    """One judged comparison. ``text_ba``/``verdict_ba`` are for the swapped order (None if
    only one order was judged); ``verdict_ba`` names positions in that swapped order.
    ``margin_ab``/``margin_ba`` are log p(A) - log p(B) in each shown order (None when the
    verdicts were sampled); ``combined_by`` is the rule that made ``preference``."""

    preference: int
    text_ab: str
    verdict_ab: Verdict
    text_ba: str | None = None
    verdict_ba: Verdict | None = None
    consistent: bool = False
    margin_ab: float | None = None
    margin_ba: float | None = None
    combined_by: str = "agree"

    @property
    def unparsable(self) -> int:
        """How many of this record's answers were unparsable."""
        return sum(v is Verdict.UNPARSABLE for v in (self.verdict_ab, self.verdict_ba))

    @property
    def s(self) -> float | None:
        """The position-balanced preference (nats; > 0: A preferred), None without margins."""
        if self.margin_ab is None or self.margin_ba is None:
            return None
        return balanced(self.margin_ab, self.margin_ba)[0]

    @property
    def bias(self) -> float | None:
        """b, the position bias (nats; > 0: the first-shown answer favoured)."""
        if self.margin_ab is None or self.margin_ba is None:
            return None
        return balanced(self.margin_ab, self.margin_ba)[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "preference": self.preference,
            "text_ab": self.text_ab,
            "verdict_ab": str(self.verdict_ab),
            "text_ba": self.text_ba,
            "verdict_ba": None if self.verdict_ba is None else str(self.verdict_ba),
            "consistent": self.consistent,
            "m_ab": self.margin_ab,
            "m_ba": self.margin_ba,
            "s": self.s,
            "b": self.bias,
            "combined_by": self.combined_by,
        }


def make_record(
    text_ab: str,
    text_ba: str | None,
    verdict_ab: Verdict | None = None,
    verdict_ba: Verdict | None = None,
    *,
    margin_ab: float | None = None,
    margin_ba: float | None = None,
    combine: str = "calibrated",
    tie_margin: float = DEFAULT_TIE_MARGIN,
) -> JudgeRecord:
    """A record from raw answer texts (parsed here unless verdicts are given). With both
    margins and ``combine = "calibrated"`` the preference is :func:`combine_margins`'s;
    otherwise :func:`combine_orders`'s agreement rule."""
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}, not {combine!r}")
    v_ab = verdict_ab if verdict_ab is not None else parse_verdict(text_ab)
    if text_ba is None and verdict_ba is None:
        return JudgeRecord(v_ab.preference, text_ab, v_ab, margin_ab=margin_ab)
    v_ba = verdict_ba if verdict_ba is not None else parse_verdict(text_ba)
    calibrated = combine == "calibrated" and margin_ab is not None and margin_ba is not None
    preference = (
        combine_margins(margin_ab, margin_ba, tie_margin)  # type: ignore[arg-type]
        if calibrated
        else combine_orders(v_ab, v_ba)
    )
    return JudgeRecord(
        preference=preference,
        text_ab=text_ab,
        verdict_ab=v_ab,
        text_ba=text_ba,
        verdict_ba=v_ba,
        consistent=is_consistent(v_ab, v_ba),
        margin_ab=margin_ab,
        margin_ba=margin_ba,
        combined_by="calibrated" if calibrated else "agree",
    )


async def _resolve(x: Any) -> Any:
    while inspect.isawaitable(x):
        x = await x
    return x


class JudgeUnavailable(PersonaError):
    """Every request of a judging batch failed: the judge cannot be reached or used."""


class _JudgeBase:
    """What every judge shares: one comparison at a time, and resettable counts."""

    stats: JudgeStats

    async def judge(self, comparisons: Sequence[Comparison]) -> list[JudgeRecord]:
        raise NotImplementedError

    async def judge_one(self, comparison: Comparison) -> JudgeRecord:
        return (await self.judge([comparison]))[0]

    def reset_stats(self) -> JudgeStats:
        """Start new counts; returns the old ones."""
        old, self.stats = self.stats, JudgeStats()
        return old


class Judge(_JudgeBase):
    """A judge model behind Tinker's sampling interface.

    ``sampler`` is an :class:`engine.llm.sampling.Sampler`-like object (``.client``,
    ``.renderer``, ``.tokenizer``, ``.decode(tokens)``). :meth:`judge` sends every request
    of a batch (both orders of each comparison) before awaiting any, at most
    ``concurrency`` in flight, so a batch pays about one round trip. ``stats`` accumulates
    over calls.
    """

    def __init__(
        self,
        sampler: Any,
        *,
        mode: JudgeMode = "verdict",
        both_orders: bool = True,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        concurrency: int = 64,
        seed: int | None = 0,
        verdict_by: str = "auto",
        combine: str = "calibrated",
        tie_margin: float = DEFAULT_TIE_MARGIN,
    ) -> None:
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}, not {combine!r}")
        if verdict_by not in ("auto", "logprobs", "sample"):
            raise ValueError(f"verdict_by must be auto, logprobs or sample, not {verdict_by!r}")
        if mode not in JUDGE_MODES:
            raise ValueError(
                f"Unknown judge mode {mode!r}: choose one of {', '.join(JUDGE_MODES)}."
            )
        self.sampler = sampler
        self.mode: JudgeMode = mode
        self.both_orders = both_orders
        self.max_tokens = int(max_tokens or DEFAULT_MAX_TOKENS[mode])
        self.temperature = float(temperature)
        self.concurrency = max(1, int(concurrency))
        self.seed = seed
        self.combine = combine
        self.tie_margin = float(tie_margin)
        self.stats = JudgeStats()
        self._failure: Exception | None = None  # the first failed request of a batch
        # In verdict mode the answer is a forced choice between "[RESULT] A" and "[RESULT] B"
        # by their log-probabilities under the judge (two scoring requests, no sampling): a
        # small judge that cannot yet write the verdict format still gives a verdict, and the
        # trained one gives exactly the choice it was trained to make. Feedback mode samples.
        can_score = hasattr(getattr(sampler, "client", None), "compute_logprobs")
        self.verdict_by = (
            ("logprobs" if mode == "verdict" and can_score else "sample")
            if verdict_by == "auto"
            else verdict_by
        )

    def _params(self) -> tinker.SamplingParams:
        return tinker.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            stop=self.sampler.renderer.get_stop_sequences(),
        )

    async def _score(self, prompt: tinker.ModelInput, preference: int) -> float:
        target = self.sampler.tokenizer.encode(verdict_text(preference), add_special_tokens=False)
        full = tinker.ModelInput.from_ints([*prompt.to_ints(), *target])
        logprobs = await _resolve(self.sampler.client.compute_logprobs(full))
        return float(sum(lp for lp in logprobs[-len(target) :] if lp is not None))

    async def _answer(
        self, comparison: Comparison, sem: asyncio.Semaphore
    ) -> tuple[str, float | None]:
        """The answer text, and the margin log p(A) - log p(B) where the verdict is scored
        (None where it is sampled: Tinker returns the sampled token's logprob only, not the
        other letter's, so a sampled verdict has no margin and falls back to agreement)."""
        prompt = build_judge_prompt(self.sampler.renderer, comparison, self.mode)
        if self.verdict_by == "logprobs":
            async with sem:
                try:
                    a, b = await asyncio.gather(
                        self._score(prompt, PREFER_A), self._score(prompt, PREFER_B)
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a failed request is an unparsable answer
                    logger.warning("judge request failed: %s", exc)
                    self._failure = self._failure or exc
                    return "", None
            if a == b:
                return f"no preference (log p of A and B both {a:.3f})", 0.0
            verdict = verdict_text(PREFER_A if a > b else PREFER_B)
            return f"{verdict} (log p A {a:.3f}, B {b:.3f})", a - b
        async with sem:
            try:
                future = self.sampler.client.sample(
                    prompt=prompt, num_samples=1, sampling_params=self._params()
                )
                result = await _resolve(future)
                return self.sampler.decode(result.sequences[0].tokens), None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failed request is an unparsable answer, not a crash
                logger.warning("judge request failed: %s", exc)
                self._failure = self._failure or exc
                return "", None

    async def judge(self, comparisons: Sequence[Comparison]) -> list[JudgeRecord]:
        """One record per comparison, in order. A failed request counts as an unparsable
        answer, but when every request of the batch failed (a dead service, a refused key)
        the first error is raised: a run of ties would hide it."""
        self._failure = None
        sem = asyncio.Semaphore(self.concurrency)
        tasks = []
        for c in comparisons:
            tasks.append(asyncio.ensure_future(self._answer(c, sem)))
            if self.both_orders:
                tasks.append(asyncio.ensure_future(self._answer(c.swap(), sem)))
        try:
            answers = await asyncio.gather(*tasks)
        finally:  # on cancellation, nothing is left running behind the caller
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if answers and self._failure is not None and not any(t for t, _m in answers):
            raise JudgeUnavailable(
                f"every judge request failed; the first: {self._failure}"
            ) from self._failure
        step = 2 if self.both_orders else 1
        records = []
        for k in range(len(comparisons)):
            text_ab, margin_ab = answers[k * step]
            text_ba, margin_ba = answers[k * step + 1] if self.both_orders else (None, None)
            record = make_record(
                text_ab,
                text_ba,
                margin_ab=margin_ab,
                margin_ba=margin_ba,
                combine=self.combine,
                tie_margin=self.tie_margin,
            )
            for text, verdict in ((text_ab, record.verdict_ab), (text_ba, record.verdict_ba)):
                if verdict is Verdict.UNPARSABLE:
                    logger.info("unparsable judge answer: %r", (text or "")[:300])
            self.stats.add_record(record)
            records.append(record)
        return records


@dataclass
class RuleJudge(_JudgeBase):
    """Same interface as :class:`Judge`, no model: prefers the shorter completion (in
    characters). tinker-cookbook's own demo of pairwise RL; for tests.

    It answers like a scoring judge: the margin for the shown order is ``strength`` nats
    toward the shorter answer (0 for equal lengths) plus ``slot_bias`` toward the first
    shown, and the verdict text is the margin's sign ("A" when it is 0). With ``slot_bias``
    above ``strength`` every answer is "A": the agreement rule then ties everything, the
    calibrated rule recovers the lengths exactly.
    """

    both_orders: bool = True
    key: Callable[[str], float] = field(default=lambda text: len(text.strip()))
    stats: JudgeStats = field(default_factory=JudgeStats)
    slot_bias: float = 0.0
    strength: float = 1.0
    combine: str = "calibrated"
    tie_margin: float = DEFAULT_TIE_MARGIN

    def _margin(self, comparison: Comparison) -> float:
        a, b = self.key(comparison.completion_a), self.key(comparison.completion_b)
        signal = self.strength if a < b else -self.strength if a > b else 0.0
        return signal + self.slot_bias

    def _answer(self, comparison: Comparison) -> tuple[str, float]:
        m = self._margin(comparison)
        return ("[RESULT] A" if m >= 0 else "[RESULT] B"), m

    async def judge(self, comparisons: Sequence[Comparison]) -> list[JudgeRecord]:
        records = []
        for c in comparisons:
            text_ab, m_ab = self._answer(c)
            text_ba, m_ba = self._answer(c.swap()) if self.both_orders else (None, None)
            record = make_record(
                text_ab,
                text_ba,
                margin_ab=m_ab,
                margin_ba=m_ba,
                combine=self.combine,
                tie_margin=self.tie_margin,
            )
            self.stats.add_record(record)
            records.append(record)
        return records


# --------------------------------------------------------------------------- trust


# A judge that decided fewer than this share of its comparisons decided "(almost) nothing":
# its win rates are ties, not results, and are not shown as if they were.
ALMOST_NOTHING = 0.1
