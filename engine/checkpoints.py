"""results/checkpoints.toml: each trained stage's latest sampler and state paths.

    [sft]
    sampler_path = "tinker://..." or a local path
    state_path = "..."
    step = 40
    total_steps = 40
    finished = true
    run = "runs/sft-20250101-120000"
    fingerprint = "..."   # what was trained (data + model + rank): resume only when it matches

Later stages look checkpoints up by stage name instead of a pasted URL.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_toml

REGISTRY = "checkpoints.toml"


def registry_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / REGISTRY


def read_registry(results_dir: str | Path, *, strict: bool = False) -> dict[str, dict[str, Any]]:
    """The registry; an unreadable one reads as empty, or raises with ``strict`` (before a write,
    so one bad edit never erases every other stage's entry)."""
    path = registry_path(results_dir)
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        if strict:
            raise ValueError(f"{path}: not valid TOML ({e}); fix or delete it, then rerun.") from e
        return {}


def latest_checkpoint(results_dir: str | Path, stage: str) -> dict[str, Any] | None:
    return read_registry(results_dir).get(stage)


def record_checkpoint(results_dir: str | Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the stage's entry and write the registry atomically."""
    reg = read_registry(results_dir, strict=True)
    entry = dict(reg.get(stage, {}))
    entry.update({k: v for k, v in fields.items() if v is not None})
    entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    reg[stage] = entry
    atomic_write_toml(registry_path(results_dir), reg)
    return entry
