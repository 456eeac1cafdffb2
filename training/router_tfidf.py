"""The TF-IDF + logistic-regression router (kind `tfidf-lr`): the baseline the learned MLP router must beat, and
a router in its own right when it routes natural questions better.

Features are word uni- and bigrams beside character 2-5-grams within words (`char_wb`), each TF-IDF block
L2-normalised on its own: character n-grams carry the domain through inflections, identifiers and words the
training questions never used (`chmod`/`chmodding`, `json.dumps`). Fitted with scikit-learn, with per-text
weights (the router stage weighs the hand-written questions above the synthetic ones); saved without pickle as
`router.json` (kind, experts, temperature, each block's settings and vocabulary) and `router.safetensors` (idf
per block, the classifier's coefficients and intercepts). A router saved before the character block (no
`char_vectorizer`) reads as word features only. Reading it back needs only numpy and the same scikit-learn
analyzers, so serving computes exactly the training features."""

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
CHAR_VECTORIZER = {"lowercase": True, "analyzer": "char_wb", "ngram_range": (2, 5), "sublinear_tf": True, "min_df": 1}
C = 100.0  # weak regularisation: the hand-written questions are few and must shape the boundary


def _analyzer(settings: dict[str, Any] = VECTORIZER) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(**settings).build_analyzer()


def _block(texts: list[str], settings: dict[str, Any], vocabulary: dict[str, int], idf: np.ndarray) -> np.ndarray:
    """Sublinear-tf x idf, L2-normalised rows: what TfidfVectorizer(**settings).transform computes."""
    analyze = _analyzer(settings)
    rows = np.zeros((len(texts), len(vocabulary)), dtype=np.float64)
    for i, text in enumerate(texts):
        for term in analyze(text):
            column = vocabulary.get(term)
            if column is not None:
                rows[i, column] += 1.0
    present = rows > 0
    rows[present] = 1.0 + np.log(rows[present])
    rows *= idf
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


@dataclass
class TfidfRouter:
    """Vocabulary + idf + one linear layer: texts -> one logit per expert."""

    experts: list[str]
    temperature: float
    vocabulary: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray  # [n_experts, n_terms (word block, then character block)]
    intercept: np.ndarray  # [n_experts]
    char_vocabulary: dict[str, int] | None = None  # None: a router saved before the character block
    char_idf: np.ndarray | None = None

    def features(self, texts: list[str]) -> np.ndarray:
        """The word block, then (when present) the character block, each as its TfidfVectorizer computes it."""
        words = _block(texts, VECTORIZER, self.vocabulary, self.idf)
        if self.char_vocabulary is None or self.char_idf is None:
            return words
        return np.hstack([words, _block(texts, CHAR_VECTORIZER, self.char_vocabulary, self.char_idf)])

    def logits(self, texts: list[str]) -> torch.Tensor:
        out = self.features(texts) @ self.coef.T + self.intercept
        return torch.from_numpy(out).float()


def fit_tfidf_router(
    texts: list[str],
    labels: list[int],
    experts: list[str],
    temperature: float,
    seed: int,
    weights: list[float] | None = None,
) -> TfidfRouter:
    """Multinomial logistic regression on the word and character TF-IDF blocks, each text weighted by `weights`
    (all 1 when None); every expert must have a text."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    missing = [name for i, name in enumerate(experts) if i not in set(labels)]
    if missing:
        raise ValueError(f"no router training text for experts {', '.join(missing)}")
    vectorizer = TfidfVectorizer(**VECTORIZER)
    chars = TfidfVectorizer(**CHAR_VECTORIZER)
    matrix = hstack([vectorizer.fit_transform(texts), chars.fit_transform(texts)]).tocsr()
    classifier = LogisticRegression(C=C, max_iter=3000, random_state=seed).fit(matrix, labels, sample_weight=weights)
    coef, intercept = classifier.coef_, classifier.intercept_
    if len(experts) == 2:  # the binary form keeps one row: logit(class 1) - logit(class 0)
        coef, intercept = np.vstack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
    vocabulary = {str(term): int(column) for term, column in vectorizer.vocabulary_.items()}
    char_vocabulary = {str(term): int(column) for term, column in chars.vocabulary_.items()}
    return TfidfRouter(
        experts,
        temperature,
        vocabulary,
        vectorizer.idf_.copy(),
        coef.copy(),
        intercept.copy(),
        char_vocabulary,
        chars.idf_.copy(),
    )


def _settings_json(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "ngram_range": list(settings["ngram_range"])}


def _settings_of(saved: dict[str, Any]) -> dict[str, Any]:
    return {**saved, "ngram_range": tuple(saved["ngram_range"])}


def save_tfidf_router(folder: Path, router: TfidfRouter) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "kind": KIND,
        "experts": router.experts,
        "temperature": router.temperature,
        "vectorizer": _settings_json(VECTORIZER),
        "vocabulary": router.vocabulary,
    }
    if router.char_vocabulary is not None:
        config["char_vectorizer"] = _settings_json(CHAR_VECTORIZER)
        config["char_vocabulary"] = router.char_vocabulary
    (folder / CONFIG_FILE).write_text(json.dumps(config, sort_keys=True))
    tensors = {
        "idf": torch.from_numpy(router.idf).double(),
        "coef": torch.from_numpy(router.coef).double(),
        "intercept": torch.from_numpy(router.intercept).double(),
    }
    if router.char_idf is not None:
        tensors["char_idf"] = torch.from_numpy(router.char_idf).double()
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return [CONFIG_FILE, WEIGHTS_FILE]


def load_tfidf_router(folder: Path) -> TfidfRouter:
    """Reads a saved `tfidf-lr` router (one without a character block as word features only); refuses one written
    with other vectoriser settings in one line."""
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    for field, expected in (("vectorizer", VECTORIZER), ("char_vectorizer", CHAR_VECTORIZER)):
        saved = _settings_of(config[field]) if field in config else expected
        if saved != expected:
            raise ValueError(f"router {folder}: {field} settings {saved} differ from this version's {expected}")
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    chars = "char_vectorizer" in config
    return TfidfRouter(
        experts=[str(e) for e in config["experts"]],
        temperature=float(config["temperature"]),
        vocabulary={str(k): int(v) for k, v in config["vocabulary"].items()},
        idf=tensors["idf"].numpy(),
        coef=tensors["coef"].numpy(),
        intercept=tensors["intercept"].numpy(),
        char_vocabulary={str(k): int(v) for k, v in config["char_vocabulary"].items()} if chars else None,
        char_idf=tensors["char_idf"].numpy() if chars else None,
    )
