"""MinHash LSH exactly as Spark ML's `MinHashLSH` computes it, for the python engine.

Spark draws each hash table's coefficients (a, b) from `scala.util.Random(seed)` (java.util.Random)
and hashes a set of feature indices as min(((1 + i) * a + b) mod 2038074743). `approxSimilarityJoin`
pairs rows that agree on at least one table and keeps those with exact Jaccard distance below the
threshold. Reproducing both here makes the python and Spark engines drop the same near-duplicates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

HASH_PRIME = 2038074743
NUM_TABLES = 8
SEED = 20240611
_MULT, _ADD, _MASK = 0x5DEECE66D, 0xB, (1 << 48) - 1


class JavaRandom:
    """java.util.Random's 48-bit LCG (only what MinHashLSH uses)."""

    def __init__(self, seed: int) -> None:
        self.state = (seed ^ _MULT) & _MASK

    def _next(self, bits: int) -> int:
        self.state = (self.state * _MULT + _ADD) & _MASK
        return self.state >> (48 - bits)

    def next_int(self, bound: int) -> int:
        r = self._next(31)
        m = bound - 1
        if bound & m == 0:
            return (bound * r) >> 31
        u = r
        while True:
            r = u % bound
            if _int32(u - r + m) >= 0:
                return r
            u = self._next(31)


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def coefficients(num_tables: int = NUM_TABLES, seed: int = SEED) -> list[tuple[int, int]]:
    rand = JavaRandom(seed)
    coefs = []
    for _ in range(num_tables):
        a = 1 + rand.next_int(HASH_PRIME - 1)
        b = rand.next_int(HASH_PRIME - 1)
        coefs.append((a, b))
    return coefs


def signature(indices: Sequence[int], coefs: Sequence[tuple[int, int]]) -> list[int]:
    """One min-hash per table over the non-zero indices (Spark requires at least one)."""
    if not indices:
        raise ValueError("MinHash needs at least one non-zero feature")
    return [min(((1 + i) * a + b) % HASH_PRIME for i in indices) for a, b in coefs]


def jaccard_distance(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return 1.0 - len(sa & sb) / len(sa | sb)


def similar_pairs(
    items: Sequence[tuple[str, Sequence[int]]], max_distance: float, num_tables: int = NUM_TABLES, seed: int = SEED
) -> list[tuple[str, str, float]]:
    """(a, b, distance) with a < b for pairs sharing a bucket in some table and distance < max_distance."""
    coefs = coefficients(num_tables, seed)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for pos, (_, indices) in enumerate(items):
        for table, value in enumerate(signature(indices, coefs)):
            buckets[(table, value)].append(pos)
    candidates = {(i, j) for members in buckets.values() for i in members for j in members if i < j}
    pairs = []
    for i, j in sorted(candidates):
        distance = jaccard_distance(items[i][1], items[j][1])
        if distance < max_distance:
            a, b = sorted((items[i][0], items[j][0]))
            pairs.append((a, b, distance))
    return sorted(pairs)


def near_duplicates(pairs: Sequence[tuple[str, str, float]]) -> dict[str, tuple[str, float]]:
    """Each document that has a similar document with a smaller key -> (that smallest key, distance)."""
    dropped: dict[str, tuple[str, float]] = {}
    for a, b, distance in pairs:
        if b not in dropped or a < dropped[b][0]:
            dropped[b] = (a, distance)
    return dropped
