"""Reading JSON Lines files (kept for callers of ``read_jsonl``; engine.results owns the formats).

Lines are decoded one by one, so a line that is not UTF-8 is a bad line naming its number, not
a UnicodeDecodeError for the whole file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _raise(path: Path) -> Callable[[int, Exception], None]:
    def on_bad(n: int, e: Exception) -> None:
        what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
        detail = f" ({e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path.name}: line {n} is {what}{detail}") from e

    return on_bad


def read_jsonl(
    path: str | Path, on_bad: Callable[[int, Exception], None] | None = None
) -> list[Any]:
    """Every non-blank line, parsed. A bad line (not JSON, not UTF-8) goes to
    ``on_bad(line_number, error)``; without one it raises ValueError naming the file and line."""
    path = Path(path)
    on_bad = on_bad or _raise(path)
    rows = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            on_bad(n, e)
    return rows
