"""Fix-up rules for generated emails: pure functions, no model, no I/O.

``fix_output(text, signoff=...)`` applies them all and returns (text, applied_rule_names).
"""

from __future__ import annotations

import re

CHAT_TOKENS = re.compile(
    r"<\|(?:im_start|im_end|endoftext|eot_id|end_of_text|begin_of_text|start_header_id|end_header_id)\|>"
)
ROLE_HEADER = re.compile(r"^\s*(?:assistant|user|system)\s*\n", re.IGNORECASE)
THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)

# "Sure! Here's a draft:", "Certainly, here is the email you asked for:", "Here's a revised version:"
PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|absolutely|okay|ok|great|got it)[!,.]*\s*)?"
    r"(?:(?:here(?:'s| is| are)|below is|i've (?:written|drafted)|i have (?:written|drafted))\b[^\n]{0,120}?[:.!]|"
    r"(?:sure|certainly|of course|absolutely)[!,.]+)\s*\n+",
    re.IGNORECASE,
)
SUBJECT = re.compile(r"^\s*\**subject:?\**[^\n]*\n+", re.IGNORECASE)
# A closing paragraph that offers more help, in an assistant's voice: "If you want, I can...",
# "Let me know if you'd like any changes", "Hope this helps", "Note: ...". It must start a new
# paragraph, and plain email sentences ("Let me know if Tuesday works.", "If you need anything
# else...") are not offers, so a real sign-off after them is never cut.
CLOSING_OFFER = re.compile(
    r"\n\s*\n\s*(?:---+\s*\n+\s*)?"
    r"(?:if you(?:'d)? (?:want|like|prefer)(?:,)? (?:i can|i could|me to)|"
    r"let me know if you(?:'d)? (?:like|want|need) (?:me to|any (?:changes|edits|adjustments|tweaks))|"
    r"i can also|would you like me to|feel free to ask|i hope this (?:helps|draft)|hope this helps|"
    r"(?:note|notes):)"
    r"[^\n]*(?:\n[^\n]+)*\s*$",
    re.IGNORECASE,
)
PLACEHOLDER = re.compile(
    r"\[(?:your name|name|recipient(?:'s)? name|date|insert [^\]]*)\]", re.IGNORECASE
)


def strip_chat_tokens(text: str) -> str:
    text = THINK.sub("", text)
    text = CHAT_TOKENS.sub("\n", text)
    text = ROLE_HEADER.sub("", text)
    return text


def _norm(s: str) -> str:
    return re.sub(r"\W+", " ", s).strip().casefold()


def trim_repetition(text: str, min_len: int = 12) -> str:
    """Drop lines that repeat an earlier line; cut a line where its sentences start looping."""
    lines = text.split("\n")
    seen: set[str] = set()
    kept: list[str] = []
    for line in lines:
        n = _norm(line)
        if n and len(n) >= min_len and n in seen:
            continue  # a repeated line: drop it, keep what follows (the sign-off)
        if n:
            seen.add(n)
        # a loop inside one line: "I will be there. I will be there. I will be there."
        sentences = re.split(r"(?<=[.!?])\s+", line)
        if len(sentences) > 2:
            s_seen: set[str] = set()
            out = []
            for s in sentences:
                sn = _norm(s)
                if sn and len(sn) >= min_len and sn in s_seen:
                    break
                s_seen.add(sn)
                out.append(s)
            if len(out) < len(sentences):
                kept.append(" ".join(out))
                break
        kept.append(line)
    out = "\n".join(kept)
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def remove_preamble(text: str) -> str:
    prev = None
    while prev != text:
        prev = text
        text = PREAMBLE.sub("", text, count=1)
        text = SUBJECT.sub("", text, count=1)
    return text


def remove_closing_offer(text: str) -> str:
    prev = None
    while prev != text:
        prev = text
        text = CLOSING_OFFER.sub("", text).rstrip()
    return text


def enforce_signoff(text: str, signoff: str) -> str:
    """Make ``signoff`` the last line: drop anything after an existing one, else append it."""
    signoff = signoff.strip()
    if (
        not signoff or not text.strip()
    ):  # nothing to sign: an empty reply stays empty (and gets rejected)
        return text
    idx = text.rfind(signoff)
    if idx >= 0:
        return text[: idx + len(signoff)].rstrip()
    return text.rstrip() + "\n\n" + signoff


def fix_output(text: str, signoff: str = "") -> tuple[str, list[str]]:
    """All rules in order. Returns the cleaned text and the names of the rules that changed it."""
    applied: list[str] = []
    steps = [
        ("chat_tokens", strip_chat_tokens),
        ("repetition", trim_repetition),
        ("preamble", remove_preamble),
        ("closing_offer", remove_closing_offer),
        ("placeholder", lambda t: PLACEHOLDER.sub("", t)),
    ]
    if signoff.strip():
        steps.append(("signoff", lambda t: enforce_signoff(t, signoff)))
    for name, fn in steps:
        new = fn(text).strip()
        if new != text.strip():
            applied.append(name)
        text = new
    return text, applied
