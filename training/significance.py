"""Paired bootstrap over documents: how much lower one model's loss is than another's on the same held-out
documents, with a percentile confidence interval. Documents, not examples or tokens, are the resampled unit,
because examples written from one document are not independent. Pure: numbers in, numbers out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0

DocScores = Mapping[str, tuple[float, int]]  # document id -> (summed NLL, scored tokens)


@dataclass(frozen=True)
class Gain:
    """Relative loss reduction of a candidate over a reference (0.05 = 5% lower loss) and its interval."""

    gain: float
    low: float
    high: float
    documents: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "gain": round(self.gain, 5),
            "low": round(self.low, 5),
            "high": round(self.high, 5),
            "documents": self.documents,
        }


def relative_gain(reference: DocScores, candidate: DocScores, samples: int = BOOTSTRAP_SAMPLES) -> Gain:
    """1 - candidate loss / reference loss over the documents both scored (token-weighted, as perplexity is),
    with a `CONFIDENCE` percentile interval from resampling those documents with replacement."""
    shared = sorted(set(reference) & set(candidate))
    if not shared:
        raise ValueError("no document was scored by both models")
    ref = np.array([reference[d] for d in shared], dtype=np.float64)
    cand = np.array([candidate[d][0] for d in shared], dtype=np.float64)
    tokens = ref[:, 1]
    if tokens.sum() <= 0:
        raise ValueError("the shared documents hold no scored tokens")
    point = 1.0 - cand.sum() / ref[:, 0].sum()
    draws = np.random.default_rng(SEED).integers(0, len(shared), size=(samples, len(shared)))
    ref_sums = ref[:, 0][draws].sum(axis=1)
    gains = 1.0 - cand[draws].sum(axis=1) / np.maximum(ref_sums, 1e-12)
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(gains, [tail, 100 - tail])
    return Gain(float(point), float(low), float(high), len(shared))


def loss_interval(scores: DocScores, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """`CONFIDENCE` percentile interval of one model's token-weighted mean loss over resampled documents."""
    values = np.array(list(scores.values()), dtype=np.float64)
    if len(values) == 0:
        raise ValueError("no documents scored")
    draws = np.random.default_rng(SEED).integers(0, len(values), size=(samples, len(values)))
    losses = values[:, 0][draws].sum(axis=1) / np.maximum(values[:, 1][draws].sum(axis=1), 1.0)
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(losses, [tail, 100 - tail])
    return float(low), float(high)
