"""The TF-IDF + logistic-regression router (kind `tfidf-lr`): the baseline the learned MLP router must beat, and
a router in its own right when it routes natural questions better.

Fitted with scikit-learn; saved without pickle as `router.json` (kind, experts, temperature, the vectoriser's
settings, vocabulary and idf) and `router.safetensors` (the classifier's coefficients and intercepts). Reading it
back needs only numpy and the same scikit-learn analyzer, so serving computes exactly the training features."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

KIND = "tfidf-lr"
CONFIG_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"
VECTORIZER = {"lowercase": True, "ngram_range": (1, 2), "sublinear_tf": True, "min_df": 1, "stop_words": "english"}


def _analyzer() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(**VECTORIZER).build_analyzer()


@dataclass
class TfidfRouter:
    """Vocabulary + idf + one linear layer: texts -> one logit per expert."""

    experts: list[str]
    temperature: float
    vocabulary: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray  # [n_experts, n_terms]
    intercept: np.ndarray  # [n_experts]

    def features(self, texts: list[str]) -> np.ndarray:
        """Sublinear-tf x idf, L2-normalised rows: what TfidfVectorizer(**VECTORIZER).transform computes."""
        analyze = _analyzer()
        rows = np.zeros((len(texts), len(self.vocabulary)), dtype=np.float64)
        for i, text in enumerate(texts):
            for term in analyze(text):
                column = self.vocabulary.get(term)
                if column is not None:
                    rows[i, column] += 1.0
        present = rows > 0
        rows[present] = 1.0 + np.log(rows[present])
        rows *= self.idf
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)

    def logits(self, texts: list[str]) -> torch.Tensor:
        out = self.features(texts) @ self.coef.T + self.intercept
        return torch.from_numpy(out).float()


def fit_tfidf_router(
    texts: list[str], labels: list[int], experts: list[str], temperature: float, seed: int
) -> TfidfRouter:
    """Multinomial logistic regression on TF-IDF uni- and bigrams; every expert must have a text."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    missing = [name for i, name in enumerate(experts) if i not in set(labels)]
    if missing:
        raise ValueError(f"no router training text for experts {', '.join(missing)}")
    vectorizer = TfidfVectorizer(**VECTORIZER)
    matrix = vectorizer.fit_transform(texts)
    classifier = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(matrix, labels)
    coef, intercept = classifier.coef_, classifier.intercept_
    if len(experts) == 2:  # the binary form keeps one row: logit(class 1) - logit(class 0)
        coef, intercept = np.vstack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
    vocabulary = {str(term): int(column) for term, column in vectorizer.vocabulary_.items()}
    return TfidfRouter(experts, temperature, vocabulary, vectorizer.idf_.copy(), coef.copy(), intercept.copy())


def save_tfidf_router(folder: Path, router: TfidfRouter) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "kind": KIND,
        "experts": router.experts,
        "temperature": router.temperature,
        "vectorizer": {**VECTORIZER, "ngram_range": list(VECTORIZER["ngram_range"])},  # type: ignore[call-overload]
        "vocabulary": router.vocabulary,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, sort_keys=True))
    tensors = {
        "idf": torch.from_numpy(router.idf).double(),
        "coef": torch.from_numpy(router.coef).double(),
        "intercept": torch.from_numpy(router.intercept).double(),
    }
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return [CONFIG_FILE, WEIGHTS_FILE]


def load_tfidf_router(folder: Path) -> TfidfRouter:
    """Reads a saved `tfidf-lr` router; refuses one written with other vectoriser settings in one line."""
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    saved = {**config["vectorizer"], "ngram_range": tuple(config["vectorizer"]["ngram_range"])}
    if saved != VECTORIZER:
        raise ValueError(f"router {folder}: vectorizer settings {saved} differ from this version's {VECTORIZER}")
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    return TfidfRouter(
        experts=[str(e) for e in config["experts"]],
        temperature=float(config["temperature"]),
        vocabulary={str(k): int(v) for k, v in config["vocabulary"].items()},
        idf=tensors["idf"].numpy(),
        coef=tensors["coef"].numpy(),
        intercept=tensors["intercept"].numpy(),
    )
