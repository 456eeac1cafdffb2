"""Hybrid retrieval over chunks: FAISS (dense), bm25s (lexical) and a SQLite document store.

The index stage builds and saves a bundle with it; the inference service loads that bundle; the
reasoning pipeline builds a small in-memory one per conversation with `from_texts`. Dense ids are
SQLite rowids, BM25 positions are rowid - 1, so every engine points at the same stored record.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from latentmas.jobs.embedding import Embedder, embed
from latentmas.jobs.tokens import SUPPORTED_VERSIONS, TOKENIZER_VERSION, tokenize
from latentmas.store import ObjectStore

Mode = Literal["hybrid", "dense", "bm25"]
Fusion = Literal["rrf", "weighted"]
Reranker = Callable[[str, list["Hit"]], list["Hit"]]

BUNDLE_VERSION = 1
RRF_K = 60


@dataclass(frozen=True)
class Record:
    """One retrievable unit (a chunk): what the document store keeps."""

    id: str
    text: str
    doc_id: str = ""
    domain: str = ""
    source: str = ""


@dataclass(frozen=True)
class Hit:
    """A search result; `scores` keeps each engine's raw score for explanations and debugging."""

    id: str
    text: str
    score: float
    source: str
    doc_id: str = ""
    domain: str = ""
    scores: dict[str, float] = field(default_factory=dict)


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion of ranked rowid lists."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, rowid in enumerate(ranking):
            fused[rowid] = fused.get(rowid, 0.0) + 1.0 / (k + rank + 1)
    return fused


def weighted(score_maps: Sequence[Mapping[int, float]], weights: Sequence[float]) -> dict[int, float]:
    """Min-max normalised scores combined linearly (a rowid missing from one engine scores 0 there)."""
    fused: dict[int, float] = {}
    for scores, weight in zip(score_maps, weights, strict=True):
        if not scores:
            continue
        low, high = min(scores.values()), max(scores.values())
        span = high - low
        for rowid, value in scores.items():
            norm = (value - low) / span if span > 0 else 1.0
            fused[rowid] = fused.get(rowid, 0.0) + weight * norm
    return fused


@dataclass(frozen=True)
class FusionParams:
    """How hybrid search fuses dense and BM25 candidates; stored in the bundle as `fusionParams`."""

    fusion: Fusion = "rrf"
    rrf_k: int = RRF_K
    dense_weight: float = 0.5

    @classmethod
    def from_info(cls, raw: Mapping[str, Any] | None) -> FusionParams:
        """From index.json (a bundle without `fusionParams` was built before tuning: RRF, k=60)."""
        if not raw:
            return cls()
        return cls(raw.get("fusion", "rrf"), int(raw.get("rrfK", RRF_K)), float(raw.get("denseWeight", 0.5)))

    def as_info(self) -> dict[str, Any]:
        return {"fusion": self.fusion, "rrfK": self.rrf_k, "denseWeight": self.dense_weight}

    def fuse(self, dense: Mapping[int, float], lexical: Mapping[int, float], mode: Mode = "hybrid") -> dict[int, float]:
        """rowid -> score for one mode (dense and bm25 pass their own scores through)."""
        if mode == "dense":
            return dict(dense)
        if mode == "bm25":
            return dict(lexical)
        if self.fusion == "rrf":
            return rrf([_ranked(dense), _ranked(lexical)], self.rrf_k)
        return weighted([dense, lexical], [self.dense_weight, 1.0 - self.dense_weight])


class DocStore:
    """SQLite rows keyed by rowid (1-based, in indexing order)."""

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS chunks (rowid INTEGER PRIMARY KEY, chunk_id TEXT UNIQUE NOT NULL, "
        "doc_id TEXT, domain TEXT, source TEXT, text TEXT NOT NULL)"
    )

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.conn = sqlite3.connect(str(path), check_same_thread=False)
        self.conn.execute(self.SCHEMA)

    def add(self, records: Sequence[Record]) -> None:
        start = len(self)
        self.conn.executemany(
            "INSERT INTO chunks (rowid, chunk_id, doc_id, domain, source, text) VALUES (?, ?, ?, ?, ?, ?)",
            [(start + i + 1, r.id, r.doc_id, r.domain, r.source, r.text) for i, r in enumerate(records)],
        )
        self.conn.commit()

    def get(self, rowids: Sequence[int]) -> dict[int, Record]:
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        rows = self.conn.execute(
            f"SELECT rowid, chunk_id, text, doc_id, domain, source FROM chunks WHERE rowid IN ({marks})",
            [int(r) for r in rowids],
        )
        return {int(row[0]): Record(row[1], row[2], row[3] or "", row[4] or "", row[5] or "") for row in rows}

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def save(self, path: Path) -> None:
        target = sqlite3.connect(str(path))
        with target:
            self.conn.backup(target)
        target.close()


def build_faiss(vectors: np.ndarray, rowids: np.ndarray, index_type: str, hnsw_threshold: int) -> Any:
    """Exact inner product for small corpora, HNSW beyond the threshold; ids are SQLite rowids."""
    import faiss

    dim = int(vectors.shape[1])
    use_hnsw = index_type == "hnsw" or (index_type == "auto" and len(vectors) >= hnsw_threshold)
    base = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT) if use_hnsw else faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(base)
    if len(vectors):
        index.add_with_ids(vectors, rowids.astype(np.int64))
    return index


def faiss_kind(index: Any) -> str:
    import faiss

    return "hnsw" if isinstance(faiss.downcast_index(index.index), faiss.IndexHNSWFlat) else "flat"


class HybridRetriever:
    """Dense + BM25 search with RRF or weighted fusion, an optional rerank hook and an optional
    per-document boost from quant insights (e.g. a document quality score in [0, 1])."""

    def __init__(self, docs: DocStore, faiss_index: Any, bm25: Any, embedder: Embedder | None, info: dict[str, Any]):
        self.docs = docs
        self.faiss_index = faiss_index
        self.bm25 = bm25
        self.embedder = embedder
        self.info = info
        # Bundles written before the tokenizer was versioned used version 1 (ASCII words only).
        self.tokenizer_version = int(info.get("tokenizer", 1))
        self.reranker: Reranker | None = None
        self.boost: dict[str, float] = {}
        self.boost_weight = 0.0

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        records: Sequence[Record],
        embedder: Embedder,
        model_name: str = "",
        index_type: str = "auto",
        hnsw_threshold: int = 50000,
        docs: DocStore | None = None,
    ) -> HybridRetriever:
        """Indexes `records` in memory (dense + BM25 + store); `save` writes the bundle."""
        import bm25s

        if not records:
            raise ValueError("cannot build a retrieval index from zero records")
        docs = docs or DocStore()
        docs.add(records)
        vectors = embed(embedder, [r.text for r in records])
        rowids = np.arange(1, len(records) + 1, dtype=np.int64)
        faiss_index = build_faiss(vectors, rowids, index_type, hnsw_threshold)
        bm25 = bm25s.BM25()
        bm25.index([tokenize(r.text) or ["<empty>"] for r in records], show_progress=False)
        info = {
            "bundleVersion": BUNDLE_VERSION,
            "model": model_name,
            "dims": int(vectors.shape[1]),
            "count": len(records),
            "faiss": faiss_kind(faiss_index),
            "bm25": True,
            "tokenizer": TOKENIZER_VERSION,
        }
        return cls(docs, faiss_index, bm25, embedder, info)

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        ids: Sequence[str],
        embedder: Embedder,
        sources: Sequence[str] | None = None,
    ) -> HybridRetriever:
        """A small in-memory index (e.g. one conversation's documents)."""
        if len(texts) != len(ids):
            raise ValueError(f"from_texts: {len(texts)} texts but {len(ids)} ids")
        srcs = list(sources) if sources is not None else list(ids)
        return cls.build([Record(i, t, i, "", s) for t, i, s in zip(texts, ids, srcs, strict=True)], embedder)

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the bundle: faiss.index, bm25/, docs.sqlite, index.json (written last)."""
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.faiss_index, str(folder / "faiss.index"))
        self.bm25.save(str(folder / "bm25"), show_progress=False)
        self.docs.save(folder / "docs.sqlite")
        if self.boost:
            (folder / "boost.json").write_text(json.dumps({"weight": self.boost_weight, "scores": self.boost}))
        (folder / "index.json").write_text(json.dumps(self.info, indent=2, sort_keys=True))
        return self.info

    @classmethod
    def load(cls, folder: str | Path, embedder: Embedder | None = None) -> HybridRetriever:
        """Opens a saved bundle; without `embedder` the one named in index.json is loaded offline."""
        import bm25s
        import faiss
        from latentmas.jobs.embedding import load_embedder

        root = Path(folder)
        meta = root / "index.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{root}: not an index bundle (index.json missing)")
        info = json.loads(meta.read_text())
        if int(info.get("tokenizer", 1)) not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{meta}: tokenizer version {info['tokenizer']} is not supported "
                f"(known: {SUPPORTED_VERSIONS}); rebuild the index"
            )
        faiss_index = faiss.read_index(str(root / "faiss.index"))
        bm25 = bm25s.BM25.load(str(root / "bm25"), show_progress=False)
        docs = DocStore(root / "docs.sqlite")
        retriever = cls(docs, faiss_index, bm25, embedder or load_embedder(info["model"]), info)
        boost_file = root / "boost.json"
        if boost_file.is_file():
            boost = json.loads(boost_file.read_text())
            retriever.set_boost(boost["scores"], float(boost["weight"]))
        return retriever

    # ---- options --------------------------------------------------------------------------------
    def set_reranker(self, reranker: Reranker | None) -> None:
        """A hook that reorders (and may rescore) the fused candidates, e.g. a cross-encoder."""
        self.reranker = reranker

    def set_boost(self, scores: Mapping[str, float], weight: float) -> None:
        """Multiplies a hit's fused score by (1 + weight * scores[doc_id]); quant insights supply scores."""
        self.boost = {str(k): float(v) for k, v in scores.items()}
        self.boost_weight = weight

    # ---- searching ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.docs)

    def dense_scores(self, query: str, depth: int) -> dict[int, float]:
        if self.embedder is None:
            raise RuntimeError("dense search needs an embedder")
        vector = embed(self.embedder, [query])
        scores, rowids = self.faiss_index.search(vector, min(depth, len(self)))
        return {int(r): float(s) for r, s in zip(rowids[0], scores[0], strict=True) if r >= 0}

    def bm25_scores(self, query: str, depth: int) -> dict[int, float]:
        tokens = tokenize(query, self.tokenizer_version)
        if not tokens:
            return {}
        positions, scores = self.bm25.retrieve([tokens], k=min(depth, len(self)), show_progress=False)
        return {int(p) + 1: float(s) for p, s in zip(positions[0], scores[0], strict=True) if s > 0}

    @property
    def fusion(self) -> FusionParams:
        """The fusion the index stage chose for this bundle (`fusionParams` in index.json, tuned on the
        natural questions' tuning half), else RRF with k=60."""
        return FusionParams.from_info(self.info.get("fusionParams"))

    def search(
        self,
        query: str,
        k: int = 5,
        mode: Mode = "hybrid",
        fusion: Fusion | None = None,
        dense_weight: float | None = None,
        depth: int | None = None,
        rrf_k: int | None = None,
        collapse: bool = False,
    ) -> list[Hit]:
        """Top-k hits; hybrid fuses dense and BM25 candidates (depth each, default max(4k, 20)) with the
        bundle's fusion unless told otherwise. `collapse` keeps each document's best chunk only."""
        tuned = self.fusion
        fusion = fusion or tuned.fusion
        if mode not in ("hybrid", "dense", "bm25") or fusion not in ("rrf", "weighted"):
            raise ValueError(f"search: unknown mode {mode!r} or fusion {fusion!r}")
        if k <= 0 or len(self) == 0:
            return []
        depth = depth or max(4 * k, 20)
        dense = self.dense_scores(query, depth) if mode in ("hybrid", "dense") else {}
        lexical = self.bm25_scores(query, depth) if mode in ("hybrid", "bm25") else {}
        params = FusionParams(
            fusion, rrf_k or tuned.rrf_k, tuned.dense_weight if dense_weight is None else dense_weight
        )
        fused = params.fuse(dense, lexical, mode)
        records = self.docs.get(list(fused))
        hits = [
            Hit(
                rec.id,
                rec.text,
                self._boosted(fused[rowid], rec.doc_id),
                rec.source,
                rec.doc_id,
                rec.domain,
                {n: s[rowid] for n, s in (("dense", dense), ("bm25", lexical)) if rowid in s},
            )
            for rowid, rec in records.items()
        ]
        hits.sort(key=lambda h: (-h.score, h.id))
        if self.reranker is not None:
            hits = self.reranker(query, hits)
        return (best_per_document(hits) if collapse else hits)[:k]

    def _boosted(self, score: float, doc_id: str) -> float:
        if not self.boost_weight or doc_id not in self.boost:
            return score
        return score * (1.0 + self.boost_weight * self.boost[doc_id])


def best_per_document(hits: Sequence[Hit]) -> list[Hit]:
    """Each document's first (best) hit, in order: neighbouring chunks of one document count once."""
    seen: set[str] = set()
    out = []
    for hit in hits:
        if hit.doc_id not in seen:
            seen.add(hit.doc_id)
            out.append(hit)
    return out


def _ranked(scores: Mapping[int, float]) -> list[int]:
    return [rowid for rowid, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))]


def fetch_bundle(store: ObjectStore, bucket: str, prefix: str, folder: Path) -> Path:
    """Downloads a bundle (`<prefix>index.json` and its files) from object storage into `folder`."""
    if not store.exists(bucket, prefix + "index.json"):
        raise FileNotFoundError(f"{bucket}/{prefix}index.json: no index bundle there")
    for info in store.list(bucket, prefix):
        store.get_file(bucket, info.key, folder / info.key.removeprefix(prefix))
    return folder


def cross_encoder_reranker(model_path: str) -> Reranker:
    """A rerank hook from a local cross-encoder folder (sentence-transformers CrossEncoder)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(model_path, device="cpu", local_files_only=True)

    def rerank(query: str, hits: list[Hit]) -> list[Hit]:
        if not hits:
            return hits
        scores = model.predict([(query, h.text) for h in hits])
        rescored = [
            replace(h, score=float(s), scores={**h.scores, "rerank": float(s)})
            for h, s in zip(hits, scores, strict=True)
        ]
        return sorted(rescored, key=lambda h: -h.score)

    return rerank
