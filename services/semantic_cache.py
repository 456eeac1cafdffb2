"""A semantic answer cache: a query whose embedding is close enough (cosine ≥ threshold) to a cached
query in the same scope gets the cached answer without running the model.

Answers depend on the adapters and the RAG index that produced them, so the cache remembers the
versions it was filled under and empties itself the moment they change (a promotion or rollback)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from latentmas.jobs.embedding import Embedder, embed
from prometheus_client import CollectorRegistry, Counter

Versions = Mapping[str, Any]


@dataclass(frozen=True)
class CacheHit:
    payload: dict[str, Any]
    similarity: float
    cached_query: str


class SemanticCache:
    """LRU-bounded; lookups are one matrix-vector product over the entries of the scope."""

    def __init__(
        self,
        embedder: Embedder,
        threshold: float = 0.92,
        max_entries: int = 2048,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`registry`: where the hit/miss/invalidation counters live (the server's /metrics registry)."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.hits = Counter(
            "latentmas_semantic_cache_hits", "Requests answered from the semantic cache.", registry=self.registry
        )
        self.misses = Counter(
            "latentmas_semantic_cache_misses", "Requests the semantic cache could not answer.", registry=self.registry
        )
        self.invalidations = Counter(
            "latentmas_semantic_cache_invalidations",
            "Times the cache was emptied because adapter or index versions changed.",
            registry=self.registry,
        )
        self.embedder = embedder
        self.threshold = threshold
        self.max_entries = max_entries
        self._versions: dict[str, Any] | None = None
        self._entries: OrderedDict[int, tuple[str, str, np.ndarray, dict[str, Any]]] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _sync(self, versions: Versions) -> None:
        current = dict(versions)
        if self._versions is not None and current != self._versions and self._entries:
            self._entries.clear()
            self.invalidations.inc()
        self._versions = current

    def lookup(self, query: str, scope: str, versions: Versions) -> CacheHit | None:
        vector = embed(self.embedder, [query])[0]
        with self._lock:
            self._sync(versions)
            best: tuple[float, int] | None = None
            for key, (entry_scope, _, entry_vector, _) in self._entries.items():
                if entry_scope != scope:
                    continue
                similarity = float(entry_vector @ vector)
                if best is None or similarity > best[0]:
                    best = (similarity, key)
            if best is None or best[0] < self.threshold:
                self.misses.inc()
                return None
            self._entries.move_to_end(best[1])
            _, cached_query, _, payload = self._entries[best[1]]
        self.hits.inc()
        return CacheHit(dict(payload), best[0], cached_query)

    def store(self, query: str, scope: str, versions: Versions, payload: dict[str, Any]) -> None:
        vector = embed(self.embedder, [query])[0]
        with self._lock:
            self._sync(versions)
            self._entries[self._next] = (scope, query, vector, dict(payload))
            self._next += 1
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
