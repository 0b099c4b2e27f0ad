"""Keep a run folder's checkpoints bounded: the last N periodic ones and the final one.

The local backend writes ``runs/<run>/checkpoints/<model_id>/{weights,sampler_weights}/<name>``
(about 88 MB per training state with its optimizer). After each checkpoint the runner calls
``prune_checkpoints``: per ``<model_id>/<kind>`` folder it keeps ``final``, the ``keep`` newest
other checkpoints (``runs.keep_checkpoints``) and every path the registry
(results/checkpoints.toml) points at, since that is what a rerun resumes from or samples.
Tinker's checkpoints are not files here: periodic ones carry a time-to-live instead.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

KEPT_NAMES = ("final",)


LOCAL_SCHEME = "local://"  # the local backend's checkpoint addresses


def _resolved(p: str | Path) -> Path | None:
    text = str(p)
    if text.startswith(LOCAL_SCHEME):
        text = text[len(LOCAL_SCHEME) :]
    elif "://" in text:  # tinker:// and other remote addresses are not files here
        return None
    try:
        return Path(text).resolve()
    except (OSError, RuntimeError):
        return None


def prune_checkpoints(
    checkpoint_dir: Path, keep: int, protect: Iterable[str | Path] = ()
) -> list[Path]:
    """Remove the older periodic checkpoints under ``checkpoint_dir``; return what was removed."""
    if not checkpoint_dir.is_dir():
        return []
    protected = {r for r in (_resolved(p) for p in protect if p) if r is not None}
    removed: list[Path] = []
    for kind_dir in sorted(checkpoint_dir.glob("*/*")):
        if not kind_dir.is_dir():
            continue
        folders = [p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        periodic = sorted(
            (p for p in folders if p.name not in KEPT_NAMES),
            key=lambda p: (p.stat().st_mtime, p.name),
        )
        drop = periodic[: max(0, len(periodic) - keep)]
        for p in drop:
            if p.resolve() in protected:
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def disk_usage(path: Path) -> int:
    """Bytes under ``path`` (files only; links not followed)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
