"""What this machine offers the local service: free cores and the CPU's bf16 support.

torch starts one compute thread per core whatever else runs there. On 2 cores already
busy with other work, two threads fight that work and each other: a 512-token forward ran
at 33 tok/s with 2 threads and 108 tok/s with 1. ``configure_threads`` picks the count from
the cores this process may use (``os.sched_getaffinity``) less the load already on them
(``/proc/loadavg``); ``PERSONA_THREADS`` or an explicit count overrides it.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

# The CPU flags that decide the dtype (Linux names, as /proc/cpuinfo spells them).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")

_configured: int | None = None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (runnable threads, this process's own included)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


def auto_threads(cpus: int | None = None, load: float | None = None) -> int:
    """Cores not already busy: usable cores less the load average, at least 1.

    A core counts as busy from a load of 0.75 on it: a thread that shares its core with
    steady work stalls every other thread at each synchronization, so one thread too many
    costs far more than one too few. Called before the service computes anything, so the
    load measured is other work.
    """
    cpus = usable_cpus() if cpus is None else cpus
    load = load_average() if load is None else load
    busy = math.floor(max(0.0, load) + 0.25)
    return max(1, min(cpus, cpus - busy))


def explicit_threads(requested: int | None = None) -> int:
    """The thread count asked for: ``requested`` > 0 (the config key ``local.threads``), else
    ``PERSONA_THREADS`` > 0; 0 when neither asks (automatic)."""
    threads = int(requested or 0)
    if threads > 0:
        return threads
    env = os.environ.get("PERSONA_THREADS", "").strip()
    try:
        return max(0, int(env)) if env else 0
    except ValueError as exc:
        raise ValueError(f"PERSONA_THREADS must be a whole number, not {env!r}") from exc


def planned_threads(requested: int | None = None) -> int:
    """The thread count ``configure_threads`` would choose now, without setting it: the one
    asked for (``explicit_threads``), else ``auto_threads()``."""
    return explicit_threads(requested) or auto_threads()


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count to ``planned_threads(requested)`` and return it."""
    global _configured
    import torch

    threads = planned_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _configured = threads
    return threads


def configured_threads() -> int | None:
    """The count the last ``configure_threads`` call chose (None before any call)."""
    return _configured


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    """/proc/cpuinfo, read once: the CPU does not change while the process runs (the Train
    tab's estimate asks for it on every change)."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def cpu_flags() -> set[str]:
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def reported_cpu_flags() -> list[str]:
    """The flags that matter for the dtype choice and speed, as this CPU has them."""
    have = cpu_flags()
    return [f for f in REPORTED_FLAGS if f in have]


def cpu_supports_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def cpu_model_name() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"
