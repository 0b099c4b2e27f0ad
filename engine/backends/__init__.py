"""Choosing the service behind Tinker's interface: ``local`` (default) or ``tinker``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.errors import PersonaError

BACKENDS = ("local", "tinker")


class BackendConfigError(PersonaError):
    """The configured backend cannot start; the message says what to change."""


def make_service_client(
    backend: str = "local",
    *,
    checkpoint_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Any:
    """A ServiceClient for ``backend``: the in-process local service or the real Tinker SDK."""
    env = os.environ if env is None else env
    if backend == "local":
        # Everything local is read from disk; make any stray hub lookup fail fast instead.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from .local import LocalServiceClient

        return LocalServiceClient(checkpoint_dir=checkpoint_dir)
    if backend == "tinker":
        api_key = env.get("TINKER_API_KEY", "").strip()
        if not api_key:
            raise BackendConfigError(
                "The tinker backend needs TINKER_API_KEY. Put `TINKER_API_KEY=...` in the "
                "workspace's .env file (or export it), or run with --backend local."
            )
        import tinker

        return tinker.ServiceClient(api_key=api_key)
    raise BackendConfigError(f"Unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
