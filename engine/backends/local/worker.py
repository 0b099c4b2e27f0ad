"""The service's worker thread: requests run one at a time, in submission order.

Every client method puts a request here and returns a future at once, as a remote service
would; an asyncio loop awaiting those futures never blocks on compute. Sampling requests
that wait in the queue together and are compatible (same model, adapter and sampling
knobs) are merged into one batched generation pass. They read frozen weights only, so
running them ahead of queued training requests changes no result.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
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
    ) -> Future:
        future: Future = Future()
        self._put(_Sample(key, rows, run, finish, future))
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

    @staticmethod
    def _run_samples(group: list[_Sample]) -> None:
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
