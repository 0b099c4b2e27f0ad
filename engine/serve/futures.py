"""Requests in flight: futures held in memory, long polls on them, and seq_id order.

Every call that the SDK polls for gets a request id at once; its work runs as a task whose
outcome (an encoded body, or an error) is kept until ``KEEP_S`` after it finished, so a
poll whose answer was lost can be repeated. ``wait`` holds a poll until the outcome is
there or ``LONG_POLL_S`` pass (then the SDK is told to try again at once).

Training calls of one model carry ``seq_id`` 1, 2, 3, ...: ``SeqGate`` lets each one
through only after all lower ones were handed to the backend (whose worker runs them in
that order). A gap that lasts ``GAP_TIMEOUT_S`` fails the waiting call instead of hanging.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field

LONG_POLL_S = 25.0  # under the SDK's 45 s poll timeout
KEEP_S = 600.0
GAP_TIMEOUT_S = 120.0


@dataclass
class Outcome:
    body: bytes
    content_type: str


class RequestError(Exception):
    """A call that failed: ``category`` is ``user`` (bad input) or ``server``."""

    def __init__(self, message: str, category: str = "user") -> None:
        super().__init__(message)
        self.category = category


@dataclass
class Pending:
    model_id: str | None
    task: asyncio.Task
    sample_sequence_ids: list[str] | None = None
    finished_at: float | None = None


class FutureTable:
    def __init__(self) -> None:
        self._items: dict[str, Pending] = {}

    def __len__(self) -> int:
        return len(self._items)

    def start(
        self,
        work: Awaitable[Outcome],
        model_id: str | None = None,
        sample_sequence_ids: list[str] | None = None,
    ) -> str:
        self._sweep()
        request_id = uuid.uuid4().hex
        task = asyncio.ensure_future(work)
        pending = Pending(model_id, task, sample_sequence_ids)
        task.add_done_callback(lambda _t: setattr(pending, "finished_at", time.monotonic()))
        self._items[request_id] = pending
        return request_id

    def get(self, request_id: str) -> Pending | None:
        return self._items.get(request_id)

    async def wait(self, request_id: str, timeout: float = LONG_POLL_S) -> Outcome | None:
        """The outcome (raises the call's ``RequestError``), or None after ``timeout``."""
        pending = self._items[request_id]
        done, _ = await asyncio.wait({pending.task}, timeout=timeout)
        if not done:
            return None
        return pending.task.result()

    def _sweep(self) -> None:
        now = time.monotonic()
        old = [
            k
            for k, p in self._items.items()
            if p.finished_at is not None and now - p.finished_at > KEEP_S
        ]
        for k in old:
            del self._items[k]

    def cancel_all(self) -> None:
        for p in self._items.values():
            p.task.cancel()


@dataclass
class SeqGate:
    """Lets seq_ids through in order: 1, 2, 3, ... (skipped ones count as passed)."""

    next_seq: int = 1
    skipped: set[int] = field(default_factory=set)
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def turn(self, seq_id: int, timeout: float = GAP_TIMEOUT_S) -> None:
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: self.next_seq >= seq_id), timeout)
            except TimeoutError:
                raise RequestError(
                    f"seq_id {seq_id} waited {timeout:g} s for seq_id {self.next_seq}, which "
                    "never arrived"
                ) from None
            if self.next_seq > seq_id:
                raise RequestError(f"seq_id {seq_id} came after seq_id {self.next_seq - 1}")

    async def passed(self, seq_id: int) -> None:
        async with self.cond:
            if seq_id == self.next_seq:
                self.next_seq += 1
            else:
                self.skipped.add(seq_id)
            while self.next_seq in self.skipped:
                self.skipped.discard(self.next_seq)
                self.next_seq += 1
            self.cond.notify_all()
