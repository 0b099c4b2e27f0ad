"""Awaiting what tinker clients return: one future, or many as they finish."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def resolve(x: Any) -> Any:
    """Await a future/awaitable if it is one (tinker clients return awaitable futures)."""
    while inspect.isawaitable(x):
        x = await x
    return x


async def as_completed_tasks(coros: Iterable[Awaitable[T]]) -> AsyncIterator[T]:
    """Run ``coros`` as tasks and yield each result as it finishes. Whatever is left is
    cancelled and awaited when the caller stops: use it under ``contextlib.aclosing``."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        for fut in asyncio.as_completed(tasks):
            yield await fut
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
