"""Reading JSON Lines files (results, synthetic data, preferences)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _raise(path: Path) -> Callable[[int, json.JSONDecodeError], None]:
    def on_bad(n: int, e: json.JSONDecodeError) -> None:
        raise ValueError(f"{path.name}: line {n} is not valid JSON ({e.msg})") from e

    return on_bad


def read_jsonl(
    path: str | Path, on_bad: Callable[[int, json.JSONDecodeError], None] | None = None
) -> list[Any]:
    """Every non-blank line, parsed. A bad line goes to ``on_bad(line_number, error)``;
    without one it raises ValueError naming the file and the line."""
    path = Path(path)
    on_bad = on_bad or _raise(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            on_bad(n, e)
    return rows
