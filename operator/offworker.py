"""Object-store calls of each stack run on their own threads, never for their timeouts on the shared
reconcile workers: a reconcile waits a short budget for its stack's call; when the budget passes it
gives its worker back (`Pending`) and the stack is woken again when the call ends. One call per stack
is in flight at a time; a call that ended after its reconcile gave up is handed to the next one (what
it read can only have grown since: manifests appear, they never vanish)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

Key = tuple[str, str]
T = TypeVar("T")


class Pending(Exception):
    """The stack's storage call is still running; its end wakes the stack."""


class OffWorker(Generic[T]):
    def __init__(self, wait_seconds: float, threads: int = 32) -> None:
        self.wait_seconds = wait_seconds
        self.on_done: Callable[[Key], None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="latentmas-store")
        self._inflight: dict[Key, Future[T]] = {}
        self._abandoned: set[Key] = set()
        self._lock = threading.RLock()  # a call that ends at once runs its done-callback under the lock

    def run(self, key: Key, call: Callable[[], T]) -> T:
        """`call()`'s result (or exception) within the wait budget; `Pending` otherwise."""
        with self._lock:
            future = self._inflight.get(key)
            if future is None:
                future = self._pool.submit(call)
                self._inflight[key] = future
                future.add_done_callback(lambda done: self._ended(key, done))
            self._abandoned.discard(key)
        try:
            result = future.result(timeout=self.wait_seconds)
        except FutureTimeout:
            with self._lock:
                if not future.done():
                    self._abandoned.add(key)
                    raise Pending(f"storage call of {key[0]}/{key[1]} still running") from None
            result = future.result()
        except BaseException:
            self._forget(key, future)
            raise
        self._forget(key, future)
        return result

    def in_flight(self, key: Key) -> bool:
        """Whether a call of this stack is still running."""
        with self._lock:
            future = self._inflight.get(key)
            return future is not None and not future.done()

    def _forget(self, key: Key, future: Future[Any]) -> None:
        with self._lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def _ended(self, key: Key, future: Future[Any]) -> None:
        """Wakes the stack whose reconcile gave up waiting for this call (it stays for that reconcile)."""
        with self._lock:
            woken = key in self._abandoned
            self._abandoned.discard(key)
        if woken and self.on_done is not None:
            self.on_done(key)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
