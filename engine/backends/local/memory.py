"""Handing the memory a closed service freed back to the operating system.

glibc's malloc keeps what PyTorch frees for reuse: a training stage's varying tensor sizes
leave gigabytes of it behind, and the next stage, on its own service thread, does not
reuse all of it. Measured with ``bench/pipeline.py --defaults`` (every stage in one
process, as the app runs them): the resident size only grew, stage after stage, to 16 GB
by the evaluation; the DITTO stage alone ended at 6.8 GB, 2.2 GB after ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():  # noqa: ANN202
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc only
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the C allocator's free pages, every thread's, to the system; False where the
    allocator has no such call (macOS, musl): nothing is done there."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
