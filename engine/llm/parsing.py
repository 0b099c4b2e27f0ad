"""Parse a teacher's list of requests: JSON (list or object), numbered or bulleted lists, plain lines.

Small models rarely return clean JSON, so everything is tolerated and the caller counts the yield.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.llm.fixups import strip_chat_tokens

MIN_WORDS = 5
MIN_CHARS = 20
_ITEM_PREFIX = re.compile(r"^\s*(?:\(?\d{1,3}[.):\]]|[-*•·]|#{1,6})\s+")
_FENCE = re.compile(r"```[a-zA-Z]*")
_KEYS = ("request", "input", "text", "prompt", "content", "task")


def normalize(text: str) -> str:
    """Key for duplicate detection: case-, space- and punctuation-insensitive."""
    return re.sub(r"[^\w]+", " ", text).strip().casefold()


def _from_json_value(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [s for x in v for s in _from_json_value(x)]
    if isinstance(v, dict):
        for k in _KEYS:
            if isinstance(v.get(k), str):
                return [v[k]]
        return [s for x in v.values() for s in _from_json_value(x)]
    return []


def _json_items(text: str) -> list[str] | None:
    dec = json.JSONDecoder()
    best: list[str] | None = None
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _end = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        items = _from_json_value(value)
        if items and (best is None or len(items) > len(best)):
            best = items
    return best


def _clean_item(s: str) -> str:
    s = _ITEM_PREFIX.sub("", s.strip())
    s = re.sub(r"^\*\*[^*]{0,60}\*\*:?\s*", "", s)  # "**Request 1:** ..."
    s = re.sub(r"^(?:request|prompt|example)\s*\d*\s*[:.-]\s*", "", s, flags=re.IGNORECASE)
    s = s.strip().rstrip(",").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1]
    return re.sub(r"\s+", " ", s.replace('\\"', '"')).strip()


def candidate_lines(text: str) -> list[str]:
    """Every item of a teacher reply (JSON strings, list items or lines), cleaned, unfiltered."""
    text = _FENCE.sub("", strip_chat_tokens(text))
    items = _json_items(text)
    if items is None:
        items = [ln for ln in text.splitlines() if ln.strip()]
        # a trailing, unterminated JSON list: '["a...", "b...'
        if len(items) == 1 and items[0].lstrip().startswith("["):
            items = re.findall(r'"((?:[^"\\]|\\.){' + str(MIN_CHARS) + r',})"', items[0])
    return [s for s in (_clean_item(raw) for raw in items) if s]


def parse_requests(text: str) -> list[str]:
    """Every item of ``text`` that reads as a request (see :func:`request_problem`); not yet
    deduplicated against anything else."""
    return [s for s in candidate_lines(text) if request_problem(s) is None]


def dedupe(items: list[str], seen: set[str] | None = None) -> list[str]:
    """Drop items whose normalized form is in ``seen`` or repeats; updates ``seen``."""
    seen = seen if seen is not None else set()
    out = []
    for s in items:
        k = normalize(s)
        if k and k not in seen:
            seen.add(k)
            out.append(s)
    return out


# --------------------------------------------------------------------------- request filter
#
# A line of teacher output counts as a request only if it reads as one: not the teacher
# talking about itself ("I am not a human and I am not a 550-word essay."), not a heading,
# within sane length bounds, not a near-copy of a demonstration, and not an exact or near
# duplicate (case/space-insensitive) of one already accepted. Shared by synth-inputs and
# rl-prompts, which report accepted, filtered and duplicate counts separately.

MAX_WORDS = 150
MAX_CHARS = 1200
NEAR_DUPLICATE = 0.8  # word-shingle Jaccard similarity at or above which two requests are one

_SELF_TALK = re.compile(
    r"\b(?:as an? (?:ai|language model|assistant|helpful assistant)"
    r"|(?:an? )?(?:ai|large) language model"
    r"|i\s*(?:am|'m)\s+(?:not\s+)?(?:an?\s+)?(?:ai|human|assistant|bot|chatbot|robot|machine|"
    r"language model|program|computer)\b"
    r"|i\s*(?:am|'m)\s+not\s+(?:an?\s+)?\d"
    r"|i\s*(?:am|'m)\s+(?:sorry|happy to|glad to|unable|not able|here to)"
    r"|i\s+(?:cannot|can't|can not|won't|will not|do not|don't)\s+(?:write|generate|"
    r"provide|help|create|produce|have)"
    r"|i\s+hope\s+(?:this|these|that)\s+(?:helps?|requests?|examples?)"
    r"|(?:these|the above|the following|the examples? above|this list)\s+(?:are|is)\s+"
    r"(?:\d+|some|a few|my|the|new|example|sample)"
    r"|here\s+(?:are|is)\s+(?:\d+|some|a few|the|my|your|an?)\b"
    r"|let me know if"
    r"|feel free to"
    r"|(?:new|example|sample)\s+requests?\s*[:.]?\s*$"
    r")",
    re.IGNORECASE,
)
_OPENERS = (
    "sure",
    "certainly",
    "of course",
    "okay",
    "ok,",
    "note:",
    "note that",
    "here are",
    "here is",
    "here's",
    "absolutely",
    "great",
    "alright",
    "hello",
    "hi!",
    "hi,",
    "thank you",
    "thanks",
    "i hope",
    "as requested",
    "below are",
    "the following",
)
# A request asks for something: an imperative or an ask, or names what is to be written.
_REQUEST_CUE = re.compile(
    r"\b(?:write|email|e-mail|draft|reply|respond|send|compose|message|tell|ask|let|"
    r"decline|turn down|invite|thank|remind|follow up|follow-up|request|notify|inform|"
    r"apologi[sz]e|cancel|reschedule|confirm|update|announce|introduce|explain|propose|"
    r"note|letter|text|memo|post|pitch|push back|nudge|check in|congratulate|welcome|"
    r"recommend|please|can you|could you|help me|i need|i want|i'd like|need to|want to)\b",
    re.IGNORECASE,
)


def near_key(text: str) -> frozenset[str]:
    """Word shingles (pairs of words; single words for very short texts) of ``normalize(text)``."""
    words = normalize(text).split()
    if len(words) < 3:
        return frozenset(words)
    return frozenset(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two :func:`near_key` sets."""
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def request_problem(s: str) -> str | None:
    """Why ``s`` (one cleaned candidate line) is not a request, or None when it reads as one."""
    words = s.split()
    if len(s) < MIN_CHARS or len(words) < MIN_WORDS:
        return "too short"
    if len(s) > MAX_CHARS or len(words) > MAX_WORDS:
        return "too long"
    low = s.lower().lstrip("\"'([ ")
    if s.rstrip().endswith(":") or s.lstrip().startswith("#"):
        return "heading"
    letters = [c for c in s if c.isalpha()]
    if sum(c.isalpha() for c in s) < 0.6 * len(s.replace(" ", "")):
        return "not prose"
    if len(letters) > 10 and sum(c.isupper() for c in letters) > 0.7 * len(letters):
        return "heading"
    if len(words) <= 8 and not re.search(r"[.?!]\s*$", s) and s.istitle():
        return "heading"
    if low.startswith(_OPENERS) or _SELF_TALK.search(s):
        return "teacher talking"
    if not _REQUEST_CUE.search(s):
        return "not a request"
    return None


@dataclass
class RequestFilter:
    """Accepts requests from teacher replies, one reply at a time, and counts what it drops.

    ``demos`` are the demonstration requests (held-out ones included: no request may copy
    one, exactly or nearly). ``accepted``/``filtered``/``duplicates`` count candidate lines;
    ``reasons`` says why lines were filtered.
    """

    demos: list[str] = field(default_factory=list)
    threshold: float = NEAR_DUPLICATE
    accepted: int = 0
    filtered: int = 0
    duplicates: int = 0
    reasons: Counter = field(default_factory=Counter)
    _exact: set[str] = field(default_factory=set)
    _keys: list[frozenset[str]] = field(default_factory=list)
    _demo_exact: set[str] = field(default_factory=set)
    _demo_keys: list[frozenset[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._demo_exact = {normalize(d) for d in self.demos}
        self._demo_keys = [near_key(d) for d in self.demos]

    @property
    def candidates(self) -> int:
        return self.accepted + self.filtered + self.duplicates

    def _near(self, key: frozenset[str], keys: list[frozenset[str]]) -> bool:
        return any(similarity(key, k) >= self.threshold for k in keys)

    def check(self, s: str) -> str | None:
        """Judge one cleaned line without recording it: None when it would be accepted,
        else ``"duplicate"`` or the reason it is filtered."""
        problem = request_problem(s)
        if problem:
            return problem
        exact, key = normalize(s), near_key(s)
        if exact in self._demo_exact or self._near(key, self._demo_keys):
            return "copies a demonstration"
        if exact in self._exact or self._near(key, self._keys):
            return "duplicate"
        return None

    def offer(self, s: str) -> bool:
        """Check one cleaned line, count it, and remember it when accepted."""
        problem = self.check(s)
        if problem == "duplicate":
            self.duplicates += 1
            return False
        if problem:
            self.filtered += 1
            self.reasons[problem] += 1
            return False
        self.accepted += 1
        self._exact.add(normalize(s))
        self._keys.append(near_key(s))
        return True

    def take(self, reply: str, limit: int | None = None) -> list[str]:
        """The accepted requests of one teacher reply (at most ``limit``; lines past it are
        not looked at, so they count nowhere)."""
        out: list[str] = []
        for s in candidate_lines(reply):
            if limit is not None and len(out) >= limit:
                break
            if self.offer(s):
                out.append(s)
        return out

    def summary(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.reasons.most_common())
        return (
            f"{self.accepted} accepted, {self.filtered} filtered"
            + (f" ({why})" if why else "")
            + f", {self.duplicates} duplicates"
        )
