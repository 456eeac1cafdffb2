"""Coalescing concurrent calls that need the model into one batched call under the model lock.

Each caller queues its item, then asks the executor (the engine's `run_exclusive`: the step lock between
decode steps) to drain the queue; the first caller to get the lock processes every item queued so far in
one call, and the callers behind it find their results ready. So requests that arrive while a decode
step runs share one forward pass instead of taking the lock one by one, without a thread of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class Coalescer(Generic[ItemT, ResultT]):
    """`coalescer(item)` -> `process([items...])[i]`, where `process` runs for whatever items are waiting
    when a caller gets the executor; an exception in `process` is raised to every caller of that batch."""

    def __init__(
        self, process: Callable[[list[ItemT]], list[ResultT]], execute: Callable[[Callable[[], Any]], Any]
    ) -> None:
        self._process = process
        self._execute = execute
        self._lock = threading.Lock()
        self._pending: list[tuple[ItemT, Future[ResultT]]] = []

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken by a batch."""
        return len(self._pending)

    def __call__(self, item: ItemT) -> ResultT:
        result: Future[ResultT] = Future()
        with self._lock:
            self._pending.append((item, result))
        self._execute(self._drain)
        return result.result()

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:  # an earlier caller's batch took this caller's item
            return
        try:
            outputs = self._process([item for item, _ in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(outputs)} results")
        except BaseException as err:
            for _, result in batch:
                result.set_exception(err)
            return
        for (_, result), output in zip(batch, outputs, strict=True):
            result.set_result(output)
