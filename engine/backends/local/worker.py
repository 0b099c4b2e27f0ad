"""The service's worker thread: requests run one at a time, in submission order.

Every client method puts a request here and returns a future at once, as a remote service
would; an asyncio loop awaiting those futures never blocks on compute. Sampling requests
that wait in the queue together and are compatible (same model, adapter and sampling
knobs) are merged into one batched generation pass. They read frozen weights only, so
running them ahead of queued training requests changes no result.

Generation requests (``stream``) are batched continuously: while a pass runs, compatible
requests queued ahead of any other kind of request join it at its next decode step, each
request's future resolves as soon as its own sequences finish, and a request whose future
is cancelled is dropped from the pass at the next step. Their futures stay pending (not
"running") until then, so ``cancel()`` works on them.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

MAX_BATCH_ROWS = 64
_live_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    """Let each worker finish its request in flight before the interpreter tears torch down;
    a thread still inside torch at exit aborts the process ("terminate called...")."""
    for worker in list(_live_workers):
        worker.close(drop_pending=True)
    for worker in list(_live_workers):
        worker.join(timeout=10)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


@dataclass
class _Sample:
    key: tuple
    rows: list  # list[GenRow]
    run: Callable[[list], list]  # generates rows -> results (list aligned with rows)
    finish: Callable[[list], Any]  # this request's results -> its future's value
    future: Future
    # Continuous batching: stream(samples, poll) generates, calling deliver(sample, results)
    # per request as it finishes; poll(free_rows) takes more compatible samples off the queue.
    stream: Callable[[list, Callable[[int], list]], None] | None = None


def deliver(sample: _Sample, results: list) -> None:
    """Resolve a (pending) sample's future with ``finish(results)``, unless it was cancelled."""
    if sample.future.done():
        return
    try:
        value = sample.finish(results)
    except BaseException as exc:  # noqa: BLE001 - delivered to the caller's future
        with contextlib.suppress(InvalidStateError):
            sample.future.set_exception(exc)
        return
    with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
        sample.future.set_result(value)


class Worker:
    def __init__(self, name: str = "persona-local") -> None:
        self._queue: deque[_Call | _Sample] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        _live_workers.add(self)

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._put(_Call(fn, future))
        return future

    def submit_sample(
        self,
        key: tuple,
        rows: list,
        run: Callable[[list], list],
        finish: Callable[[list], Any],
        stream: Callable[[list, Callable[[int], list]], None] | None = None,
    ) -> Future:
        future: Future = Future()
        self._put(_Sample(key, rows, run, finish, future, stream))
        return future

    def _put(self, item: _Call | _Sample) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("The local service is closed; create a new ServiceClient.")
            self._queue.append(item)
            self._cv.notify()

    def close(self, drop_pending: bool = False) -> None:
        with self._cv:
            self._closed = True
            if drop_pending:
                for item in self._queue:
                    item.future.cancel()
                self._queue.clear()
            self._cv.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _next(self) -> list[_Call | _Sample] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            head = self._queue.popleft()
            if not isinstance(head, _Sample):
                return [head]
            group: list[_Call | _Sample] = [head]
            rows = len(head.rows)
            for item in list(self._queue):
                if (
                    isinstance(item, _Sample)
                    and item.key == head.key
                    and rows + len(item.rows) <= MAX_BATCH_ROWS
                ):
                    self._queue.remove(item)
                    group.append(item)
                    rows += len(item.rows)
            return group

    def _loop(self) -> None:
        while True:
            group = self._next()
            if group is None:
                return
            if isinstance(group[0], _Call):
                self._run_call(group[0])  # type: ignore[arg-type]
            else:
                self._run_samples(group)  # type: ignore[arg-type]

    @staticmethod
    def _run_call(call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except BaseException as exc:  # noqa: BLE001 - delivered to the caller's future
            call.future.set_exception(exc)

    def _take_compatible(self, key: tuple, room: int) -> list[_Sample]:
        """Queued samples with ``key`` (at most ``room`` rows), ahead of any other request."""
        taken: list[_Sample] = []
        with self._cv:
            for item in list(self._queue):
                if not isinstance(item, _Sample):
                    break  # never overtake a training request
                if item.key != key:
                    continue
                if item.future.cancelled():
                    self._queue.remove(item)
                    continue
                if len(item.rows) > room:
                    break  # keep the order among compatible requests
                self._queue.remove(item)
                taken.append(item)
                room -= len(item.rows)
        return taken

    def _run_stream(self, group: list[_Sample]) -> None:
        handed = [s for s in group if not s.future.cancelled()]
        if not handed:
            return

        def poll(room: int) -> list[_Sample]:
            more = self._take_compatible(handed[0].key, room)
            handed.extend(more)
            return more

        try:
            handed[0].stream(list(handed), poll)  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001
            for s in handed:
                if not s.future.done():
                    with contextlib.suppress(InvalidStateError):
                        s.future.set_exception(exc)

    def _run_samples(self, group: list[_Sample]) -> None:
        if group[0].stream is not None:
            self._run_stream(group)
            return
        live = [s for s in group if s.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = live[0].run([row for s in live for row in s.rows])
        except BaseException as exc:  # noqa: BLE001
            for s in live:
                s.future.set_exception(exc)
            return
        start = 0
        for s in live:
            part = results[start : start + len(s.rows)]
            start += len(s.rows)
            try:
                s.future.set_result(s.finish(part))
            except BaseException as exc:  # noqa: BLE001
                s.future.set_exception(exc)
