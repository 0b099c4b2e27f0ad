"""Choosing the service behind Tinker's interface: ``local`` (default) or ``tinker``.

Also the few backend rules the rest of the program shares:

- ``configure_hub(backend)``: the Hugging Face hub is off for the local backend only (it
  reads everything from disk); on Tinker the SDK fetches the model's tokenizer from the hub.
  The CLI calls it before anything imports huggingface_hub, the runner before every run, so
  the app can switch backends between runs.
- ``not_found_as_file_error()``: a stage resuming from a checkpoint catches
  ``FileNotFoundError`` whichever service lost the checkpoint.
- ``describe_compute(config)``: backend, device and dtype for ``persona status`` and the app
  header, without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from engine.errors import PersonaError

BACKENDS = ("local", "tinker")

# What the person set before Persona touched it (None: unset).
_USER_HUB_OFFLINE = os.environ.get("HF_HUB_OFFLINE")


class BackendConfigError(PersonaError):
    """The configured backend cannot start; the message says what to change."""


def configure_hub(backend: str) -> None:
    """Hub off for ``local``; for ``tinker`` as the person had it (on unless they set it off).

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import: when it is already imported
    (the app switching backends between runs) its constant is updated too."""
    value = "1" if backend == "local" else _USER_HUB_OFFLINE
    if value is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = value
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        offline = str(value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        constants.HF_HUB_OFFLINE = offline


def quiet_libraries() -> None:
    """No progress bars or weight-loading chatter from transformers/hub on a terminal or screen."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import logging
    import sys

    # the SDK logs a warning at every "try again" answer to a poll (a server holding a long
    # request says it every 25 s): not news for a person watching a run
    logging.getLogger("tinker.lib.api_future_impl").setLevel(logging.ERROR)
    tf_logging = sys.modules.get("transformers.utils.logging")
    if tf_logging is not None:
        with contextlib.suppress(Exception):
            tf_logging.set_verbosity_error()
            tf_logging.disable_progress_bar()


@contextlib.contextmanager
def not_found_as_file_error() -> Iterator[None]:
    """Inside it, a checkpoint the service does not have raises ``FileNotFoundError``
    (tinker's ``NotFoundError`` included), as a missing local folder does."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as e:
        from engine.backends.tinker_service import CheckpointNotFound, classify

        if type(e).__module__.startswith("tinker") and classify(e) == "not_found":
            raise CheckpointNotFound(str(e)) from e
        raise


def _cpu_has_bf16() -> bool:
    """The rule of engine/backends/local/hardware.py, read without importing the backend
    (its package imports torch)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def describe_compute(config: Any) -> dict[str, str]:
    """{"backend", "device", "dtype"} a run would use (the local choice predicted cheaply)."""
    backend = config.backend.name
    if backend != "local":
        return {"backend": backend, "device": "Tinker service", "dtype": "service default"}
    device = os.environ.get("PERSONA_DEVICE") or (
        "cuda" if shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists() else "cpu"
    )
    dtype = os.environ.get("PERSONA_DTYPE") or config.local.dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bf16 (if the GPU has it)"
        else:
            dtype = "bf16" if _cpu_has_bf16() else "fp32 (this CPU has no bf16)"
    return {"backend": backend, "device": device, "dtype": dtype}


def make_service_client(
    backend: str = "local",
    *,
    checkpoint_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    connect_timeout: float = 30.0,
    metadata: Mapping[str, str] | None = None,
    local_threads: int = 0,
    local_dtype: str = "auto",
    tinker_client_factory: Any = None,
) -> Any:
    """A ServiceClient for ``backend``: the in-process local service or the real Tinker SDK
    (wrapped in ``TinkerService``: bounded connection, clear errors, retries, metadata).
    ``TINKER_BASE_URL`` from the workspace's .env (or the environment) picks the service,
    e.g. a ``persona serve`` on another machine."""
    env = os.environ if env is None else env
    configure_hub(backend)
    if backend == "local":
        from .local import LocalServiceClient

        kwargs: dict[str, Any] = {}
        if local_dtype and local_dtype != "auto":
            kwargs["dtype"] = local_dtype
        if local_threads:
            kwargs["threads"] = int(local_threads)
        return LocalServiceClient(checkpoint_dir=checkpoint_dir, **kwargs)
    if backend == "tinker":
        api_key = env.get("TINKER_API_KEY", "").strip()
        if not api_key:
            raise BackendConfigError(
                "The tinker backend needs TINKER_API_KEY. Put `TINKER_API_KEY=...` in the "
                "workspace's .env file (or export it), or run with --backend local."
            )
        from .tinker_service import TinkerService

        meta = {k: str(v) for k, v in (metadata or {}).items()}
        display = " ".join(
            x for x in ("persona", meta.get("stage", ""), meta.get("workspace", "")) if x
        )
        base_url = env.get("TINKER_BASE_URL", "").strip() or os.environ.get("TINKER_BASE_URL")
        extra: dict[str, Any] = {"base_url": base_url} if base_url else {}
        probe = None
        if tinker_client_factory is None:
            import tinker
            from tinker.lib.base_url import resolve_base_url

            from .tinker_service import http_probe

            tinker_client_factory = tinker.ServiceClient
            probe = http_probe(resolve_base_url(base_url), api_key, min(5.0, connect_timeout))
        try:
            client = tinker_client_factory(
                user_metadata=meta, display_name=display, api_key=api_key, **extra
            )
        except Exception as e:  # the SDK checks the key's form: "must start with 'tml-'"
            if "api_key" in str(e) or "API key" in str(e):
                raise BackendConfigError(
                    f"The Tinker SDK refused TINKER_API_KEY: {e}. Put the key from the Tinker "
                    "console in the workspace's .env file as `TINKER_API_KEY=tml-...`, or run "
                    "with --backend local."
                ) from None
            raise
        return TinkerService(client, connect_timeout=connect_timeout, metadata=meta, probe=probe)
    raise BackendConfigError(f"Unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
