"""results/human_preferences.jsonl: the person's blind A/B picks (engine-free helper).

One JSON object per line:
    {"ts": ..., "input": ..., "a": "sft", "b": "baseline", "choice": "a"|"b"|"tie",
     "winner": "sft"|"baseline"|"tie", "loser": ...}
Appended and fsynced, so a crash loses at most the pick in flight.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from engine.jsonl import read_jsonl

PREFERENCES_FILE = "human_preferences.jsonl"


def preference_record(request: str, a: str, b: str, choice: str) -> dict[str, Any]:
    if choice not in ("a", "b", "tie"):
        raise ValueError(f"choice must be a, b or tie, not {choice!r}")
    winner = {"a": a, "b": b, "tie": "tie"}[choice]
    loser = {"a": b, "b": a, "tie": "tie"}[choice]
    return {
        "ts": round(time.time(), 3),
        "input": request,
        "a": a,
        "b": b,
        "choice": choice,
        "winner": winner,
        "loser": loser,
    }


def append_preference(results_dir: str | Path, record: dict[str, Any]) -> Path:
    path = Path(results_dir) / PREFERENCES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_preferences(results_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(results_dir) / PREFERENCES_FILE
    if not path.exists():
        return []
    return read_jsonl(path, lambda n, e: None)  # a torn line (a crash mid-append) is skipped
