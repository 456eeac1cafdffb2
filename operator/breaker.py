"""A per-stack circuit breaker for object storage: after a failure, a stack's store is not contacted
again until its backoff has passed, so an unreachable endpoint costs one short timeout per backoff
period instead of holding a shared reconcile worker on every reconcile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BASE_SECONDS = 5.0
MAX_SECONDS = 300.0


def open_seconds(failures: int) -> float:
    """How long the breaker stays open after `failures` consecutive failures (5 s doubling to 5 min)."""
    return float(min(BASE_SECONDS * 2 ** max(failures - 1, 0), MAX_SECONDS))


@dataclass
class _State:
    failures: int
    until: float
    message: str


@dataclass
class CircuitBreaker:
    clock: Callable[[], float] = time.monotonic
    _states: dict[tuple[str, str], _State] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def blocked(self, key: tuple[str, str]) -> str | None:
        """The reason not to contact this stack's store now, or None when a try is due."""
        with self._lock:
            state = self._states.get(key)
            if state is None or self.clock() >= state.until:
                return None
            wait = state.until - self.clock()
            return f"storage unreachable, next try in {wait:.0f} s (failure {state.failures}): {state.message}"

    def failed(self, key: tuple[str, str], message: str) -> None:
        with self._lock:
            failures = self._states[key].failures + 1 if key in self._states else 1
            self._states[key] = _State(failures, self.clock() + open_seconds(failures), message)

    def succeeded(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._states.pop(key, None)
