"""Parse a teacher's list of requests: JSON (list or object), numbered or bulleted lists, plain lines.

Small models rarely return clean JSON, so everything is tolerated and the caller counts the yield.
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.fixups import strip_chat_tokens

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


def _looks_valid(s: str) -> bool:
    if len(s) < MIN_CHARS or len(s.split()) < MIN_WORDS:
        return False
    if s.endswith(":") or s.lower().startswith(
        ("here are", "here is", "sure", "certainly", "note")
    ):
        return False
    return sum(c.isalpha() for c in s) >= 0.6 * len(s.replace(" ", ""))


def parse_requests(text: str) -> list[str]:
    """Every plausible request in ``text`` (not yet deduplicated against anything else)."""
    text = _FENCE.sub("", strip_chat_tokens(text))
    items = _json_items(text)
    if items is None:
        items = [ln for ln in text.splitlines() if ln.strip()]
        # a trailing, unterminated JSON list: '["a...", "b...'
        if len(items) == 1 and items[0].lstrip().startswith("["):
            items = re.findall(r'"((?:[^"\\]|\\.){' + str(MIN_CHARS) + r',})"', items[0])
    out = []
    for raw in items:
        s = _clean_item(raw)
        if _looks_valid(s):
            out.append(s)
    return out


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
