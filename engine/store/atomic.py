"""Atomic file writes: temp file in the same folder, fsync, os.replace.

A reader (the TUI, another stage, a crashed run's replay) sees either the old file
or the new one, never half of one.

- The written file keeps the destination's permission bits, or gets the umask's for a new
  file (not mkstemp's 0600).
- Temp files are named ``.<name>.<pid>.<random>.tmp``; one left by a writer that died (kill -9
  mid-write) is removed by the next write of the same file.
- A failed write (a full disk, a read-only folder) raises ``WriteError``, which names the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tomli_w

from engine.errors import PersonaError

try:  # POSIX: serialise writers of one file (fcntl is not on Windows)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock shared by every writer of ``path`` (a hidden sidecar file), for
    read-modify-write updates such as the checkpoint registry and the synthetic file."""
    path = Path(path)
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class WriteError(PersonaError, OSError):
    """Writing a file failed; the message names the file and the reason."""

    def __init__(self, path: str | Path, err: OSError):
        reason = (err.strerror or str(err)).rstrip(". ")
        hint = {
            errno.ENOSPC: "free some disk space, then run it again",
            errno.EDQUOT: "free some disk space, then run it again",
            errno.EROFS: "the folder is read-only; make it writable, then run it again",
            errno.EACCES: "make the folder writable, then run it again",
            errno.EPERM: "make the folder writable, then run it again",
        }.get(err.errno or 0, "")
        msg = f"could not write {path}: {reason}" + (f"; {hint}" if hint else "")
        super().__init__(err.errno or 0, msg)
        self.path = Path(path)
        self.message = msg

    def __str__(self) -> str:
        return self.message


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the portable way
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours, or one we may not signal)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(path: str | Path) -> list[Path]:
    """Remove temp files of ``path`` left by writers that are no longer running."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        middle = name[len(prefix) : -len(".tmp")].split(".")
        if len(middle) == 2 and middle[0].isdigit():  # .<name>.<pid>.<random>.tmp
            if pid_alive(int(middle[0])):
                continue
        elif len(middle) != 1:  # not one of ours
            continue
        # else: the older mkstemp form .<name>.<random>.tmp (no pid): left by a dead writer
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e) from e
    clean_stale_temps(path)
    mode = _target_mode(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from e
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def check_writable(folder: str | Path) -> Path:
    """Prove ``folder`` takes a new file (create, write, fsync, remove) before a stage spends
    minutes on work it could not save. Raises WriteError naming the folder."""
    folder = Path(folder)
    probe = folder / f".persona-write-check.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise WriteError(folder, e) from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_toml(path: str | Path, data: dict[str, Any]) -> Path:
    return atomic_write_text(path, tomli_w.dumps(data))
