"""``tinker://<run>/<kind>/<name>`` checkpoint paths mapped to folders under the server's root.

A path never resolves outside the root: each part must be a plain name (no ``..``, no
leading dot, no separators), and no folder on the way may be a symbolic link.
"""

from __future__ import annotations

from pathlib import Path

SCHEME = "tinker://"
KINDS = ("weights", "sampler_weights")


class PathRefused(ValueError):
    """A checkpoint path that is malformed or would leave the server's root."""


def _plain(part: str, what: str, path: str) -> str:
    bad = (
        not part
        or part in (".", "..")
        or part.startswith(".")
        or any(c in part for c in "/\\\x00")
        or len(part) > 200
    )
    if bad:
        raise PathRefused(f"{path}: the {what} {part!r} is not a plain name")
    return part


def folder_for(root: Path, path: str) -> Path:
    """The folder of checkpoint ``path`` under ``root`` (which need not exist yet)."""
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise PathRefused(f"{path!r}: checkpoint paths read tinker://<run>/<kind>/<name>")
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 3:
        raise PathRefused(f"{path}: checkpoint paths read tinker://<run>/<kind>/<name>")
    run, kind, name = parts
    _plain(run, "run", path)
    _plain(name, "name", path)
    if kind not in KINDS:
        raise PathRefused(f"{path}: the kind must be one of {', '.join(KINDS)}")
    base = root.resolve()
    folder = base
    for part in (run, kind, name):
        folder = folder / part
        if folder.is_symlink():
            raise PathRefused(f"{path}: {part!r} is a symbolic link; the server does not follow it")
    if not folder.resolve().is_relative_to(base):
        raise PathRefused(f"{path}: resolves outside the server's checkpoint folder")
    return folder


def run_folder(root: Path, run: str) -> Path:
    _plain(run, "run", run)
    folder = root.resolve() / run
    if folder.is_symlink():
        raise PathRefused(f"{run!r} is a symbolic link; the server does not follow it")
    return folder


def path_for(root: Path, folder: Path) -> str:
    """The tinker:// path of a checkpoint folder under ``root``."""
    rel = folder.resolve().relative_to(root.resolve())
    if len(rel.parts) != 3:
        raise PathRefused(f"{folder} is not <run>/<kind>/<name> under {root}")
    return SCHEME + "/".join(rel.parts)
