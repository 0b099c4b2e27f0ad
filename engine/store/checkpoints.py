"""results/checkpoints.toml: each trained stage's latest sampler and state paths.

    [sft]
    sampler_path = "tinker://..." or a local path
    state_path = "..."
    step = 40
    total_steps = 40
    finished = true
    run = "runs/sft-20250101-120000"
    fingerprint = "..."   # what was trained (data + model + rank): resume only when it matches

Later stages look checkpoints up by stage name instead of a pasted URL. Every read goes
through one checked reader (``load_registry``): an entry that is not a table, or a known field
of the wrong type (``step = "four"``, ``sampler_path = []``), is named with the file, the entry
and the expected type, never handed to a stage; and a write keeps such entries as written.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import PersonaError
from engine.store.atomic import atomic_write_toml, file_lock

REGISTRY = "checkpoints.toml"

# The fields stages write and read, with the type each must have; others pass unchecked.
_TEXT = "a string"
_WHOLE = "a whole number"
_FLAG = "true or false"
_TABLE = "a table"
FIELD_TYPES: dict[str, str] = {
    **dict.fromkeys(
        (
            "sampler_path",
            "state_path",
            "reference_path",
            "buffer_path",
            "checkpoint",
            "run",
            "fingerprint",
            "final_fingerprint",
            "base_model",
            "backend",
            "mode",
            "holdout",
            "init",
            "updated",
        ),
        _TEXT,
    ),
    **dict.fromkeys(("step", "total_steps", "round", "total_rounds", "dev_evaluated"), _WHOLE),
    **dict.fromkeys(("finished", "use_base", "use_system_prompt", "stopped_early"), _FLAG),
    **dict.fromkeys(("settings", "other_settings", "inputs", "last_finished"), _TABLE),
}


class RegistryError(PersonaError, ValueError):
    """results/checkpoints.toml cannot be read; the message names it and says what to do."""


@dataclass(frozen=True)
class RegistryRead:
    """The registry as read: the entries that passed the checks, and what is wrong with the
    rest (``problems``: entry name -> message naming the file, entry and expected type).
    ``error`` is set when the file as a whole cannot be read (then there are no entries)."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    error: str = ""

    def problem(self, stages: Iterable[str] | None = None) -> str:
        """What stops a stage that reads ``stages`` (None: every entry); "" when nothing."""
        if self.error:
            return self.error
        wanted = self.problems if stages is None else [s for s in stages if s in self.problems]
        return "; ".join(self.problems[s] for s in wanted)


def registry_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / REGISTRY


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _why(e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.start + 1})"
    if isinstance(e, OSError):
        return f"cannot be read ({e.strerror or e})"
    return f"not valid TOML ({e})"


def _fits(value: Any, kind: str) -> bool:
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _WHOLE:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _TABLE:
        return isinstance(value, dict)
    return isinstance(value, bool)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 40 else text[:39] + "…"


def entry_problem(file: str, stage: str, entry: Any) -> str:
    """ "" when ``entry`` is a usable checkpoint entry, else a message naming the file, the
    entry, the field and the type it must have."""
    if not isinstance(entry, dict):
        return (
            f"{file}: [{stage}] must be a table (a [{stage}] header with sampler_path = ... "
            f"under it), not {stage} = {_shown(entry)}; fix or remove it, or rerun {stage}"
        )
    return _field_problem(file, stage, entry, "")


def _field_problem(file: str, stage: str, entry: dict[str, Any], prefix: str) -> str:
    for key, kind in FIELD_TYPES.items():
        if key in entry and not _fits(entry[key], kind):
            return (
                f"{file}: [{stage}] {prefix}{key} must be {kind}, not {_shown(entry[key])}; "
                f"fix it, or rerun {stage} to record it again"
            )
    kept = entry.get("last_finished")  # the finished run kept beside an unfinished retrain
    return _field_problem(file, stage, kept, "last_finished.") if isinstance(kept, dict) else ""


def _read_raw(path: Path) -> dict[str, Any]:
    """The file's TOML as written ({} when absent); RegistryError when it cannot be read."""
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise RegistryError(
            f"{_name(path)}: {_why(e)}; fix it or delete it (the stages it names then train "
            "again), then rerun"
        ) from e


def load_registry(results_dir: str | Path) -> RegistryRead:
    """The checked registry; never raises (see ``RegistryRead``)."""
    path = registry_path(results_dir)
    try:
        raw = _read_raw(path)
    except RegistryError as e:
        return RegistryRead(error=str(e))
    entries: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}
    for stage, entry in raw.items():
        problem = entry_problem(_name(path), stage, entry)
        if problem:
            problems[stage] = problem
        else:
            entries[stage] = entry
    return RegistryRead(entries, problems)


def read_registry(results_dir: str | Path, *, strict: bool = False) -> dict[str, dict[str, Any]]:
    """The registry's checked entries. Lenient by default (an unreadable file reads as empty,
    a bad entry is left out: for views); ``strict`` raises RegistryError on any problem."""
    read = load_registry(results_dir)
    if strict and read.problem():
        raise RegistryError(read.problem())
    return read.entries


def require_registry(results_dir: str | Path, stages: Iterable[str] | None = None) -> RegistryRead:
    """The registry, checked for a stage that reads the entries ``stages`` (None: all of
    them): raises RegistryError naming the file and the entry when any of them is unusable."""
    read = load_registry(results_dir)
    problem = read.problem(stages)
    if problem:
        raise RegistryError(problem)
    return read


def check_registry(results_dir: str | Path) -> str:
    """ "" when the registry reads cleanly (or is absent), else a message naming the file
    (and the entries that cannot be used)."""
    return load_registry(results_dir).problem()


def latest_checkpoint(results_dir: str | Path, stage: str) -> dict[str, Any] | None:
    """The stage's checked entry, or None when it has none; RegistryError (naming the file,
    entry and expected type) when the file or this entry cannot be used."""
    return require_registry(results_dir, [stage]).entries.get(stage)


def record_checkpoint(results_dir: str | Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the stage's entry and write the registry atomically, under a
    lock: two stages running at once (two terminals) must not roll each other's entry back.
    Every other entry is written back as it was, including one that fails the checks."""
    path = registry_path(results_dir)
    with file_lock(path):
        reg = _read_raw(path)  # an unreadable file raises: one bad edit never erases the rest
        old = reg.get(stage, {})
        if not isinstance(old, dict):
            raise RegistryError(entry_problem(_name(path), stage, old))
        entry = dict(old)
        entry.update({k: v for k, v in fields.items() if v is not None})
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        reg[stage] = entry
        atomic_write_toml(path, reg)
    return entry


def update_entry(
    results_dir: str | Path, stage: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]
) -> dict[str, Any]:
    """Replace the stage's entry with ``change(old entry)``, atomically and under the lock
    (a training run's lifecycle decides which old fields survive, see engine.run.train_run).
    The stage's own entry must pass the checks (RegistryError names it otherwise); every
    other entry is written back as it was, including one that fails them."""
    path = registry_path(results_dir)
    with file_lock(path):
        reg = _read_raw(path)  # an unreadable file raises: one bad edit never erases the rest
        old = reg.get(stage)
        problem = entry_problem(_name(path), stage, old) if old is not None else ""
        if problem:
            raise RegistryError(problem)
        entry = dict(change(old))
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        reg[stage] = entry
        atomic_write_toml(path, reg)
    return entry
