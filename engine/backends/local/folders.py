"""Publishing a folder whole: build it in a temp folder beside its place, then rename it in.

A reader sees the old folder or the new one, never a half-written one. Used for the model
cache and for checkpoints.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish_folder(
    target: Path, build: Callable[[Path], None], *, replace: bool, durable: bool
) -> Path:
    """Run ``build(tmp)`` and move ``tmp`` to ``target``.

    ``replace``: an existing ``target`` is set aside until the new one is in place (without
    it, the rename fails on an existing non-empty folder). ``durable``: fsync the files and
    the folders first, for folders that a registry on disk will point to.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if durable:
            _fsync_tree(tmp)
        old = None
        if replace and target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if durable:
            _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
