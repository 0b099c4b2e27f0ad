"""Default text the ``init`` command writes into a new workspace's data/prompts.toml.

Placeholders in templates are replaced literally (``{examples}``, ``{seed}``, ``{n}``,
``{request}``, ``{draft}``, ``{critique}``, ``{system_prompt}``), so other braces a user
types stay as they are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import tomli_w

from engine.store.atomic import atomic_write_text

DEFAULT_SEEDS = [
    "research project communication",
    "turn down request",
    "open source outreach",
    "job & career context",
    "social events",
    "time-sensitive crisis communications",
    "reimbursement request",
    "communication with health care providers (e.g., dentist, insurance companies)",
    "legal & compliance",
    "cold emailing",
]

PROMPTS_TOML_TEMPLATE = '''\
# Persona prompts: the system prompt, the rubric, topic seeds and synthesis templates.
# Edited in the TUI (Prompts & Rubric tab) or by hand.

system_prompt = """
You write emails for Maya, a PhD student in environmental microbiology. Write exactly as she does:
- Open with "Hi <first name> —" (an em dash, no comma). For groups: "Hi all —".
- First sentence states the point. No small talk, no "I hope this email finds you well".
- Short: two or three brief paragraphs, under 120 words. A short bulleted list only for amounts or questions.
- Concrete: names, dates written like "Thu 11/6" or "Mon 3/17", amounts, room numbers.
- Friendly and direct; one clear ask; offers a practical next step.
- Always end with "Thanks!" on its own line, then "— Maya" on the last line.
Output only the email body: no subject line, no preamble, no notes after the sign-off.
"""

rubric = """
1. Greeting: starts with "Hi <name> —" (em dash), or "Hi all —" for a group.
2. The first sentence states the purpose; no filler or pleasantries.
3. Length: under about 120 words, two or three short paragraphs.
4. Specifics from the request appear: names, dates in "Day M/D" form, amounts.
5. One clear ask or next step.
6. Ends with "Thanks!" then "— Maya"; nothing after the sign-off.
7. No assistant artifacts: no "Sure, here's...", no offers to revise, no subject line.
"""

seeds = __SEEDS__

[templates]
synth_inputs = """
You write requests that a person gives to an email-writing assistant. Examples of such requests:

{examples}

Write {n} new requests on this topic: {seed}.
Each request must be different from the examples and from each other, and must carry real context:
who the email is to (a name and role), what the person wants, and dates or numbers.
Answer with a JSON list of {n} strings and nothing else.
"""

critique = """
A writer's style guide:
{system_prompt}

Request: {request}

Draft email:
{draft}

List, briefly, every way the draft breaks the style guide or misses facts from the request.
"""

revise = """
Request: {request}

Draft email:
{draft}

Problems found:
{critique}

Rewrite the email so it fixes every problem. Output only the email.
"""
'''
PROMPTS_TOML_TEMPLATE = PROMPTS_TOML_TEMPLATE.replace(
    "__SEEDS__", "[\n" + "".join(f"    {json.dumps(seed)},\n" for seed in DEFAULT_SEEDS) + "]"
)


def fill(template: str, **values: object) -> str:
    """Replace ``{name}`` placeholders literally; leave any other braces alone."""
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", str(v))
    return out.strip()


def _kind(v: object) -> str:
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, int | float):
        return f"the number {v}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, str):
        return "text"
    return type(v).__name__


def prompts_problems(data: dict, name: str = "data/prompts.toml") -> list[str]:
    """Every value of the wrong type in a parsed data/prompts.toml, each naming file and key."""
    problems = []
    for key in ("system_prompt", "rubric"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{name}: {key} must be text (in quotes), found {_kind(data[key])}")
    if "seeds" in data:
        seeds = data["seeds"]
        if not isinstance(seeds, list):
            problems.append(f"{name}: seeds must be a list of strings, found {_kind(seeds)}")
        else:
            for i, s in enumerate(seeds, start=1):
                if not isinstance(s, str):
                    problems.append(f"{name}: seeds item {i} must be text, found {_kind(s)}")
            if all(isinstance(s, str) for s in seeds) and not [s for s in seeds if s.strip()]:
                problems.append(f"{name}: seeds is empty; add at least one topic seed")
    if "templates" in data:
        templates = data["templates"]
        if not isinstance(templates, dict):
            problems.append(f"{name}: [templates] must be a table, found {_kind(templates)}")
        else:
            for key, value in templates.items():
                if not isinstance(value, str):
                    problems.append(
                        f"{name}: templates.{key} must be text (in quotes), found {_kind(value)}"
                    )
    return problems


def header_of(text: str) -> str:
    """The comment lines a prompts file starts with (its explanation), kept on save."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#") or (lines and not line.strip()):
            lines.append(line)
        else:
            break
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


_ESCAPES = {"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\r": "\\r"}


def toml_text(value: str) -> str:
    """A TOML string as a person writes it: quotes stay quotes, line breaks stay line breaks.
    Only what TOML needs is escaped (backslashes, control characters, a third quote in a row)."""
    if "\n" not in value:
        return tomli_w.dumps({"v": value}, multiline_strings=False)[len("v = ") :].strip()
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch == '"' and len(out) >= 2 and out[-1] == out[-2] == '"':
            out.append('\\"')  # """ would end the string
        elif (ord(ch) < 0x20 and ch not in "\n\t") or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    body = "".join(out)
    if body.endswith('"'):
        body = body[:-1] + '\\"'  # a quote right before the closing """
    return '"""\n' + body + '"""'


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return toml_text(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "[\n" + "".join(f"    {toml_text(v)},\n" for v in value) + "]"
    return tomli_w.dumps({"v": value})[len("v = ") :].strip()


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_text(key)


def prompts_text(prompts: dict[str, Any], old_text: str = "") -> str:
    """data/prompts.toml as a person would write it: the file's header comments, a blank line
    between entries, multi-line strings as multi-line strings with their quotes unescaped,
    one seed per line."""
    header = header_of(old_text) or header_of(PROMPTS_TOML_TEMPLATE)
    tables = {k: v for k, v in prompts.items() if isinstance(v, dict)}
    parts = [header] if header else []
    parts += [f"{_key(k)} = {_toml_value(v)}" for k, v in prompts.items() if k not in tables]
    for name, table in tables.items():
        entries = [f"{_key(k)} = {_toml_value(v)}" for k, v in table.items()]
        parts.append(f"[{_key(name)}]\n" + "\n\n".join(entries))
    return "\n\n".join(parts) + "\n"


def write_prompts(path: Path, prompts: dict[str, Any]) -> Path:
    try:
        old = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        old = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, prompts_text(prompts, old))
