"""The server's API key: one ``tml-`` key, generated once (mode 0600) or read from a file.

The SDK checks that a key starts with ``tml-`` before it sends anything, so the server's
keys do too. The key is compared in constant time and never written to a log or an error.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from engine.errors import PersonaError

KEY_PREFIX = "tml-"


class KeyFileError(PersonaError):
    """The key file cannot be used; the message names the file and the problem."""


def cache_root() -> Path:
    root = os.environ.get("PERSONA_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "persona"


def default_key_file() -> Path:
    return cache_root() / "serve_api_key"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_key(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key file ({e.strerror or e}).") from None
    if not text.startswith(KEY_PREFIX) or len(text) < len(KEY_PREFIX) + 16 or len(text.split()) > 1:
        raise KeyFileError(
            f"{path}: the key must be one line starting with {KEY_PREFIX!r} and at least 16 "
            "more characters (the Tinker SDK refuses other keys)."
        )
    return text


def load_or_create_key(key_file: Path | None) -> tuple[str, Path, bool]:
    """(key, its file, created now). ``key_file`` given: it must exist. Otherwise the default
    file is read, or written with a new key (mode 0600, never overwritten)."""
    if key_file is not None:
        return read_key(key_file), key_file, False
    path = default_key_file()
    if path.exists():
        return read_key(path), path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another server started at the same moment: use its key
        return read_key(path), path, False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key, path, True


def readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def key_matches(given: str | None, key: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), key.encode())
