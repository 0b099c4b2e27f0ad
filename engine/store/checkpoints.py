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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import PersonaError
from engine.store.atomic import atomic_write_toml, file_lock

REGISTRY = "checkpoints.toml"


class RegistryError(PersonaError, ValueError):
    """results/checkpoints.toml cannot be read; the message names it and says what to do."""


def registry_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / REGISTRY


def read_registry(results_dir: str | Path, *, strict: bool = False) -> dict[str, dict[str, Any]]:
    """The registry; an unreadable one reads as empty, or raises with ``strict`` (before a write,
    so one bad edit never erases every other stage's entry)."""
    path = registry_path(results_dir)
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        if strict:
            raise RegistryError(f"{_name(path)}: {_why(e)}; fix or delete it, then rerun") from e
        return {}
    # an entry that is not a table (``sft = 5``) is not a checkpoint: never hand it out
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def check_registry(results_dir: str | Path) -> str:
    """ "" when the registry reads cleanly (or is absent), else a message naming the file."""
    path = registry_path(results_dir)
    try:
        read_registry(results_dir, strict=True)
    except RegistryError as e:
        return str(e)
    if not path.exists():
        return ""
    data = tomllib.loads(path.read_bytes().decode("utf-8"))
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        return f"{_name(path)}: entry {bad[0]!r} must be a table ([{bad[0]}]); it is ignored"
    return ""


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _why(e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.start + 1})"
    if isinstance(e, OSError):
        return f"cannot be read ({e.strerror or e})"
    return f"not valid TOML ({e})"


def latest_checkpoint(results_dir: str | Path, stage: str) -> dict[str, Any] | None:
    return read_registry(results_dir).get(stage)


def record_checkpoint(results_dir: str | Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the stage's entry and write the registry atomically, under a
    lock: two stages running at once (two terminals) must not roll each other's entry back."""
    with file_lock(registry_path(results_dir)):
        reg = read_registry(results_dir, strict=True)
        entry = dict(reg.get(stage, {}))
        entry.update({k: v for k, v in fields.items() if v is not None})
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        reg[stage] = entry
        atomic_write_toml(registry_path(results_dir), reg)
    return entry


def update_entry(
    results_dir: str | Path, stage: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]
) -> dict[str, Any]:
    """Replace the stage's entry with ``change(old entry)``, atomically and under the lock
    (a training run's lifecycle decides which old fields survive, see engine.run.train_run)."""
    with file_lock(registry_path(results_dir)):
        reg = read_registry(results_dir, strict=True)
        entry = dict(change(reg.get(stage)))
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        reg[stage] = entry
        atomic_write_toml(registry_path(results_dir), reg)
    return entry
