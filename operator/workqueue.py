"""A keyed work queue for the asyncio loop kopf runs in: events for a stack (its own, its Jobs', its
pods') collapse into one pending reconcile; one stack is never reconciled by two workers at once; a
reconcile can ask to run again after a delay (backoffs, manifest polling, schedule resync)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from latentmas.operator import metrics

Key = tuple[str, str]
log = logging.getLogger("latentmas.operator.queue")


class WorkQueue:
    def __init__(self, work: Callable[[Key], Awaitable[float | None]], workers: int = 4) -> None:
        self._work = work
        self._workers = workers
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, key: Key) -> None:
        """Schedules a reconcile of `key` now (coalesced with one already pending)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._running:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)
            metrics.QUEUE_DEPTH.set(len(self._queued))

    def add_after(self, key: Key, delay: float) -> None:
        """Schedules a reconcile after `delay` seconds unless an earlier one is already due."""
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        due = loop.time() + delay
        if existing is not None and existing.when() <= due:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_at(due, self._fire, key)

    def forget(self, key: Key) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"latentmas-worker-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            metrics.QUEUE_DEPTH.set(len(self._queued))
            self._running.add(key)
            delay: float | None = None
            try:
                delay = await self._work(key)
            except Exception:
                log.exception("reconcile of %s/%s failed; retrying", *key)
                delay = 5.0
            finally:
                self._running.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            elif delay is not None:
                self.add_after(key, delay)
