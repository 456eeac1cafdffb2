"""Banded MinHash LSH for near-duplicate documents, shared by the python and the Spark engine.

A document's signature is NUM_PERM min-hashes of its shingle indices, h_k(i) = ((1 + i)·a_k + b_k)
mod 2038074743 with (a_k, b_k) drawn from a fixed seed; the signature is cut into BANDS bands of
ROWS values, and each band hashes to one 64-bit bucket key. Two documents are candidates when they
share a bucket in any band (for BANDS=20, ROWS=6 a pair with Jaccard 0.8 is a candidate with
probability 0.998, one with 0.5 with 0.27); candidates are verified with their exact Jaccard.

Dedupe is query-then-insert in key order: a document is dropped when it is similar to an already
*kept* document, otherwise it is kept and inserted into the buckets. Both engines compute the same
signatures and band keys with these functions (Spark inside its tasks), so they keep the same set.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

HASH_PRIME = 2038074743
BANDS = 20
ROWS = 6
NUM_PERM = BANDS * ROWS
SEED = 20240611


def coefficients(num_perm: int = NUM_PERM, seed: int = SEED) -> np.ndarray:
    """(num_perm, 2) int64 hash coefficients a in [1, p), b in [0, p)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, HASH_PRIME, size=num_perm, dtype=np.int64)
    b = rng.integers(0, HASH_PRIME, size=num_perm, dtype=np.int64)
    return np.stack([a, b], axis=1)


_COEFS = coefficients()


def signature(indices: Sequence[int], coefs: np.ndarray = _COEFS) -> np.ndarray:
    """NUM_PERM min-hashes of a non-empty set of shingle indices (< 2^20, so no int64 overflow)."""
    if not len(indices):
        raise ValueError("MinHash needs at least one shingle")
    values = np.asarray(indices, dtype=np.int64)[:, None] + 1
    return ((values * coefs[:, 0] + coefs[:, 1]) % HASH_PRIME).min(axis=0)


def band_keys(sig: np.ndarray, bands: int = BANDS, rows: int = ROWS) -> list[int]:
    """One signed 64-bit bucket key per band (the band number is part of the key)."""
    keys = []
    for band in range(bands):
        chunk = sig[band * rows : (band + 1) * rows].astype("<i8").tobytes()
        digest = hashlib.blake2b(band.to_bytes(2, "little") + chunk, digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little", signed=True))
    return keys


def doc_bands(indices: Sequence[int]) -> list[int]:
    """The band keys of one document's shingles (what both engines store per document)."""
    return band_keys(signature(indices))


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb)


def is_similar(a: Sequence[int], b: Sequence[int], threshold: float) -> bool:
    """The one comparison both engines use: Jaccard distance below 1 - threshold."""
    return 1.0 - jaccard(a, b) < 1.0 - threshold


@dataclass
class DedupeResult:
    kept: list[str] = field(default_factory=list)
    dropped: dict[str, tuple[str, float]] = field(default_factory=dict)  # source -> (kept source, jaccard)
    candidates: int = 0  # candidate pairs verified
    similar: int = 0  # verified pairs above the threshold


def dedupe(
    items: Iterable[tuple[str, Sequence[int]]],
    threshold: float,
    lookup: Callable[[str], Sequence[int]] | None = None,
) -> DedupeResult:
    """Query-then-insert over (key, shingles) in key order: drop a document similar to a kept one.
    With `lookup` (key -> shingles, e.g. from a spill on disk) `items` must already be in key order
    and kept documents' shingles are not held in memory, only their band keys."""
    buckets: dict[int, list[int]] = defaultdict(list)
    kept: list[tuple[str, Sequence[int]]] = []
    result = DedupeResult()
    ordered = items if lookup is not None else sorted(items, key=lambda item: item[0])
    for key, shingles in ordered:
        bands = doc_bands(shingles)
        candidates = sorted({pos for band in bands for pos in buckets.get(band, ())})
        match: tuple[str, float] | None = None
        for pos in candidates:  # kept positions are in key order: the first similar one is the smallest key
            result.candidates += 1
            other, other_shingles = kept[pos]
            if lookup is not None:
                other_shingles = lookup(other)
            if is_similar(shingles, other_shingles, threshold):
                result.similar += 1
                match = (other, jaccard(shingles, other_shingles))
                break
        if match:
            result.dropped[key] = match
            continue
        for band in bands:
            buckets[band].append(len(kept))
        kept.append((key, () if lookup is not None else shingles))
        result.kept.append(key)
    return result


def greedy_keep(keys: Sequence[str], similar: Mapping[str, Sequence[tuple[str, float]]]) -> DedupeResult:
    """The same decision from a list of verified similar pairs (b -> [(a, jaccard)] with a < b), as the
    Spark engine computes them: in key order, b is dropped when one of its a is kept (the smallest)."""
    kept: set[str] = set()
    result = DedupeResult()
    for key in sorted(keys):
        match = min(((a, j) for a, j in similar.get(key, ()) if a in kept), default=None)
        if match:
            result.dropped[key] = match
        else:
            kept.add(key)
            result.kept.append(key)
    return result


def near_duplicate_families(families: int, variants: int, words: int = 300, seed: int = 7) -> list[tuple[str, str]]:
    """(key, text) test and benchmark data: `families` unrelated random texts, each in `variants`
    copies with 1% of the words replaced (Jaccard of 5-gram shingles about 0.9 within a family, about
    0 across families). Key `f<family>/v<variant>.txt`; v000 is the family's smallest key."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i}" for i in range(20000)])
    out = []
    for family in range(families):
        base = rng.choice(vocabulary, size=words)
        for variant in range(variants):
            text = base.copy()
            if variant:
                positions = rng.choice(words, size=max(1, words // 100), replace=False)
                text[positions] = rng.choice(vocabulary, size=len(positions))
            out.append((f"f{family:05d}/v{variant:03d}.txt", " ".join(text) + "."))
    return out
