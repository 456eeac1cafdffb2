"""The index stage: embeddings (sentence-transformers, offline), FAISS, bm25s and a SQLite document
store in one versioned bundle under `bundle/`, evaluated on held-out query -> chunk pairs.

Embedding is incremental and batched: chunks whose vectors the promoted index's cycle saved (same text,
embedder identity and chunking settings, `embeddings.parquet`) are reused, only the rest are encoded,
on the GPU when the spec gives the stage one (`pipeline.rag.gpu`).

Two evaluations: the natural questions (`latentmas.jobs.retrieval_eval`: document-level relevance, the
fusion parameter of `pipeline.rag.fusion` tuned on their tuning half and stored in the bundle as
`fusionParams`, which serving uses; every mode reported on the test half), and the older synthetic one
(`metrics.retrieval`): one tf-idf question per chunk of the held-out documents of the stack's stored split
(`latentmas.jobs.splits`, the assignment synth computes, so index does not wait for synth).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from latentmas.jobs.cleaning import STOPWORDS, WORD
from latentmas.jobs.embedding import ReusingEmbedder, embedder_identity, load_embedder
from latentmas.jobs.quant import read_quality
from latentmas.jobs.questions import load_natural_questions
from latentmas.jobs.retrieval import HybridRetriever, Record
from latentmas.jobs.retrieval_eval import evaluate_natural
from latentmas.jobs.splits import HELDOUT, corpus_documents, ensure_splits
from latentmas.jobs.synth import doc_title, read_chunks, read_corpus
from latentmas.registry import load_registry
from latentmas.stage import StageContext, StageResult, stage_prefix
from latentmas.store import ObjectNotFound

EMBEDDINGS = "embeddings.parquet"  # chunk vectors by reuse key, read by the next cycle's index stage
CPU_BATCH, GPU_BATCH = 32, 256  # texts per encode batch
MODES: tuple[tuple[str, str], ...] = (("bm25", "rrf"), ("dense", "rrf"), ("hybrid", "rrf"), ("hybrid", "weighted"))


def content_words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text) if len(w) > 3 and w.isalpha() and w.lower() not in STOPWORDS]


def distinctive_question(text: str, title: str, idf: Mapping[str, float], terms: int = 4) -> str | None:
    """A question from the chunk's highest tf-idf words: what a user who read it might ask."""
    tf = Counter(content_words(text))
    ranked = sorted(tf, key=lambda w: (-tf[w] * idf.get(w, 0.0), w))[:terms]
    if len(ranked) < 3:
        return None
    where = f" in {title}" if title else ""
    return f"What does the documentation say about {', '.join(ranked[:-1])} and {ranked[-1]}{where}?"


def eval_pairs(
    chunks: Sequence[Mapping[str, str]], titles: Mapping[str, str], heldout: set[str], limit: int
) -> list[tuple[str, str]]:
    """(query, relevant chunk id) for held-out chunks, spread evenly over them, at most `limit`."""
    df = Counter(w for c in chunks for w in set(content_words(c["text"])))
    idf = {w: math.log(len(chunks) / n) for w, n in df.items()}
    pairs = []
    for chunk in chunks:
        if chunk["doc_id"] in heldout:
            query = distinctive_question(chunk["text"], titles.get(chunk["doc_id"], ""), idf)
            if query:
                pairs.append((query, chunk["chunk_id"]))
    if len(pairs) <= limit:
        return pairs
    step = len(pairs) / limit
    return [pairs[int(i * step)] for i in range(limit)]


def evaluate(retriever: HybridRetriever, pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """recall@5 and nDCG@10 (one relevant chunk per query) for each retrieval mode."""
    results: dict[str, dict[str, float]] = {}
    for mode, fusion in MODES:
        recall = ndcg = 0.0
        for query, relevant in pairs:
            ranked = [h.id for h in retriever.search(query, k=10, mode=mode, fusion=fusion)]  # type: ignore[arg-type]
            if relevant in ranked[:5]:
                recall += 1
            if relevant in ranked:
                ndcg += 1.0 / math.log2(ranked.index(relevant) + 2)
        name = mode if mode != "hybrid" else f"hybrid_{fusion}"
        n = max(len(pairs), 1)
        results[name] = {"recall@5": round(recall / n, 4), "ndcg@10": round(ndcg / n, 4), "queries": len(pairs)}
    return results


def upload_bundle(ctx: StageContext, folder: Path) -> list[str]:
    """Uploads every bundle file; index.json last, so a reader that sees it sees the whole bundle."""
    files = [*sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "index.json"), folder / "index.json"]
    names = []
    for path in files:
        name = "bundle/" + path.relative_to(folder).as_posix()
        ctx.store.put_file(ctx.bucket, ctx.key(name), path)
        names.append(name)
    return names


def embedding_device(gpus: int) -> str:
    """cuda when the stage was given a GPU (rag.gpu > 0) and torch sees one; a one-line error when a GPU
    was asked for but none is visible."""
    if gpus <= 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"pipeline.rag.gpu is {gpus} but torch sees no CUDA device in the index stage")
    return "cuda"


def promoted_embeddings(ctx: StageContext) -> dict[str, np.ndarray]:
    """The chunk vectors saved by the index stage behind the promoted index version (empty before the
    first promotion, or when that cycle's artifacts are gone: then every chunk is embedded)."""
    active = load_registry(ctx.store, ctx.bucket, ctx.config.namespace, ctx.config.stack).index.active()
    if active is None or not active.cycle:
        return {}
    key = stage_prefix(ctx.config.namespace, ctx.config.stack, active.cycle, "index") + EMBEDDINGS
    try:
        table = pq.read_table(io.BytesIO(ctx.store.get_bytes(ctx.bucket, key)))
    except ObjectNotFound:
        return {}
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32)
    matrix = vectors.reshape(table.num_rows, -1) if table.num_rows else vectors.reshape(0, 0)
    return dict(zip(table.column("key").to_pylist(), matrix, strict=True))


def save_embeddings(ctx: StageContext, vectors: Mapping[str, np.ndarray]) -> None:
    """This cycle's chunk vectors by reuse key, for the next cycle's incremental index (not served)."""
    keys = sorted(vectors)
    dims = len(vectors[keys[0]]) if keys else 0
    flat = pa.array(np.concatenate([vectors[k] for k in keys]) if keys else np.zeros(0, np.float32))
    table = pa.table({"key": pa.array(keys, pa.string()), "vector": pa.FixedSizeListArray.from_arrays(flat, dims)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    ctx.store.put_bytes(ctx.bucket, ctx.key(EMBEDDINGS), buffer.getvalue())


def run(ctx: StageContext) -> StageResult:
    rag = ctx.spec.pipeline.rag
    ctx.read_manifest("clean")
    quality = read_quality(ctx) if rag.quality_boost > 0 else {}  # before the slow part: quant must be done
    chunks = read_chunks(ctx)
    if not chunks:
        raise RuntimeError(f"{ctx.bucket}/{ctx.prefix('clean')}rag_chunks.jsonl has no chunks to index")
    corpus = read_corpus(ctx)
    ctx.progress(1, 4, phase="loading-model", chunks=len(chunks))
    device = embedding_device(rag.gpu)
    embedder = load_embedder(rag.embedding_model, device)
    cleaning = ctx.spec.pipeline.cleaning
    reusing = ReusingEmbedder(
        embedder,
        promoted_embeddings(ctx),
        embedder_identity(rag.embedding_model),
        f"chunk_chars={cleaning.chunk_chars},chunk_overlap={cleaning.chunk_overlap}",
        batch_size=GPU_BATCH if device == "cuda" else CPU_BATCH,
    )
    records = [Record(c["chunk_id"], c["text"], c["doc_id"], c["domain"], c["source"]) for c in chunks]
    retriever = HybridRetriever.build(records, reusing, rag.embedding_model, rag.index_type, rag.hnsw_threshold)
    retriever.embedder = embedder  # queries are not cached
    save_embeddings(ctx, reusing.vectors)
    if quality:
        retriever.set_boost(quality, rag.quality_boost)
    ctx.progress(2, 4, phase="indexed", chunks=len(records))

    titles = {r["doc_id"]: doc_title(r) for r in corpus}
    splits, _ = ensure_splits(ctx, corpus_documents(ctx))
    heldout = splits.of(HELDOUT)
    pairs = eval_pairs(chunks, titles, heldout, rag.eval_queries)
    scores = evaluate(retriever, pairs)
    domains = sorted({r.domain for r in records})
    questions = load_natural_questions(domains)
    tuned, natural = evaluate_natural(retriever, questions, ctx.spec.pipeline.cleaning.raw_prefix, rag.fusion)
    ctx.progress(3, 4, phase="evaluated", queries=len(pairs), natural_questions=sum(natural["questions"].values()))

    retriever.info.update(
        {
            "evaluation": scores,
            "naturalEvaluation": natural,
            "fusion": rag.fusion,
            "fusionParams": tuned.as_info(),
            "domains": domains,
        }
    )
    folder = ctx.workdir / "bundle"
    info: dict[str, Any] = retriever.save(folder)
    outputs = [*upload_bundle(ctx, folder), EMBEDDINGS]
    ctx.progress(4, 4, phase="uploaded", files=len(outputs))
    import faiss

    return StageResult(
        outputs=outputs,
        counts={"chunks": len(records), "documents": len({r.doc_id for r in records}), "evalQueries": len(pairs)},
        metrics={
            "retrieval": scores,
            "naturalRetrieval": natural,
            "fusionParams": tuned.as_info(),
            "index": {k: info[k] for k in ("model", "dims", "count", "faiss")},
            "embedding": {"device": device, "embedded": reusing.embedded, "reused": reusing.reused},
        },
        versions={
            "faiss": faiss.__version__,
            "bm25s": _version("bm25s"),
            "sentence-transformers": _version("sentence_transformers"),
        },
    )


def _version(module: str) -> str:
    return str(getattr(__import__(module), "__version__", "unknown"))
