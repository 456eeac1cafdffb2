"""The clean stage: raw objects -> cleaned corpus, RAG chunks, per-document metrics and a quarantine.

Two engines, one result: `python` runs the shared per-document functions in-process (small data, the
local demo); `spark` runs the same functions inside Spark tasks and does dedupe with Spark SQL and
Spark ML's MinHashLSH (scale, in-cluster). Outputs are staged in the workdir (python) or a temporary
s3a prefix (Spark) and only then written under the stage prefix, before the manifest.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from latentmas.cycle import raw_digest
from latentmas.jobs.cleaning import METRIC_NAMES, CleanDoc, Rejected, is_hidden, near_detail, process_object
from latentmas.jobs.minhash import near_duplicates, similar_pairs
from latentmas.spec import CleaningSpec
from latentmas.stage import StageContext, StageResult
from latentmas.store import ObjectInfo

CORPUS, CHUNKS, METRICS, QUARANTINE = "corpus.parquet", "rag_chunks.jsonl", "metrics.parquet", "quarantine.jsonl"
OUTPUTS = [CORPUS, CHUNKS, METRICS, QUARANTINE]
CORPUS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("domain", pa.string()),
        ("source", pa.string()),
        ("format", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("chars", pa.int64()),
        ("content_hash", pa.string()),
    ]
)
METRICS_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("domain", pa.string())] + [(m, pa.float64()) for m in METRIC_NAMES]
)


@dataclass
class CleanOutput:
    """The python engine's result, ordered by source (the Spark engine writes the same rows)."""

    docs: list[CleanDoc]
    rejected: list[Rejected]


def list_raw(ctx: StageContext, prefix: str) -> list[ObjectInfo]:
    """The raw objects to clean; a one-line error when the bucket or prefix is missing or empty."""
    if not ctx.store.bucket_exists(ctx.raw_bucket):
        raise RuntimeError(f"raw bucket {ctx.raw_bucket!r} does not exist")
    objects = sorted(ctx.store.list(ctx.raw_bucket, prefix), key=lambda o: o.key)
    if not objects:
        raise RuntimeError(f"raw bucket {ctx.raw_bucket!r} has no objects under prefix {prefix!r}")
    return objects


def resolve_duplicates(docs: Sequence[CleanDoc], threshold: float) -> CleanOutput:
    """Exact duplicates (same text hash) then near duplicates (MinHash LSH); the smallest source wins."""
    ordered = sorted(docs, key=lambda d: d.source)
    first: dict[str, str] = {}
    unique: list[CleanDoc] = []
    rejected: list[Rejected] = []
    for doc in ordered:
        if doc.content_hash in first:
            rejected.append(
                Rejected(doc.source, doc.domain, "exact_duplicate", f"same text as {first[doc.content_hash]}")
            )
        else:
            first[doc.content_hash] = doc.source
            unique.append(doc)
    dropped = near_duplicates(similar_pairs([(d.source, d.shingles) for d in unique], 1.0 - threshold))
    kept = []
    for doc in unique:
        if doc.source in dropped:
            rejected.append(Rejected(doc.source, doc.domain, "near_duplicate", near_detail(*dropped[doc.source])))
        else:
            kept.append(doc)
    return CleanOutput(kept, rejected)


def clean_python(objects: Iterable[tuple[str, bytes]], spec: CleaningSpec) -> CleanOutput:
    docs: list[CleanDoc] = []
    rejected: list[Rejected] = []
    for key, data in objects:
        for item in process_object(key, data, spec):
            if isinstance(item, CleanDoc):
                docs.append(item)
            else:
                rejected.append(item)
    out = resolve_duplicates(docs, spec.near_duplicate_threshold)
    out.rejected = sort_rejected(rejected + out.rejected)
    return out


def sort_rejected(rows: Iterable[Rejected]) -> list[Rejected]:
    return sorted(rows, key=lambda r: (r.source, r.reason))


def write_python_outputs(ctx: StageContext, out: CleanOutput) -> None:
    """Writes every output to the workdir first, then uploads them (no half-written object)."""
    folder = ctx.workdir / "clean"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [
        {"doc_id": d.doc_id, "domain": d.domain, "source": d.source, "format": d.fmt, "title": d.title,
         "text": d.text, "chars": len(d.text), "content_hash": d.content_hash}
        for d in out.docs
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(corpus, CORPUS_SCHEMA), folder / CORPUS)
    metrics = [{"doc_id": d.doc_id, "domain": d.domain, **d.metrics} for d in out.docs]
    pq.write_table(pa.Table.from_pylist(metrics, METRICS_SCHEMA), folder / METRICS)
    write_jsonl(folder / CHUNKS, (c.as_dict() for d in out.docs for c in d.chunks))
    write_jsonl(folder / QUARANTINE, (r.as_dict() for r in out.rejected))
    for name in OUTPUTS:
        ctx.store.put_file(ctx.bucket, ctx.key(name), folder / name)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def count_outputs(ctx: StageContext, objects: int) -> dict[str, int]:
    """Counts read back from the published outputs, so both engines report them the same way."""
    metrics = pq.read_table(
        io.BytesIO(ctx.store.get_bytes(ctx.bucket, ctx.key(METRICS))), columns=["domain", "chunk_count"]
    )
    domains = Counter(metrics.column("domain").to_pylist())
    reasons = Counter(
        json.loads(line)["reason"] for line in ctx.store.get_bytes(ctx.bucket, ctx.key(QUARANTINE)).splitlines()
    )
    counts = {"objects": objects, "documents": metrics.num_rows, "quarantined": sum(reasons.values())}
    counts["chunks"] = int(sum(metrics.column("chunk_count").to_pylist()))
    counts.update({f"domain_{d}": n for d, n in sorted(domains.items())})
    counts.update({f"quarantined_{r}": n for r, n in sorted(reasons.items())})
    return counts


def run(ctx: StageContext) -> StageResult:
    spec = ctx.spec.pipeline.cleaning
    objects = list_raw(ctx, spec.raw_prefix)
    total_bytes = sum(o.size for o in objects)
    ctx.progress(0, 3, phase="listed", objects=len(objects), bytes=total_bytes)
    clock = time.monotonic()
    versions: dict[str, str] = {}
    if spec.engine == "spark":
        from latentmas.jobs.clean_spark import clean_spark

        versions = clean_spark(ctx, spec, objects)
    else:
        pairs = ((o.key, ctx.store.get_bytes(ctx.raw_bucket, o.key)) for o in objects)
        out = clean_python(pairs, spec)
        ctx.progress(1, 3, phase="cleaned", documents=len(out.docs))
        write_python_outputs(ctx, out)
    counts = count_outputs(ctx, len(objects))
    seconds = time.monotonic() - clock
    ctx.progress(3, 3, phase="written", **counts)
    metrics = {
        "engine": spec.engine,
        "inputs": {"bucket": ctx.raw_bucket, "prefix": spec.raw_prefix, "objects": len(objects), "bytes": total_bytes},
        "seconds": round(seconds, 3),
        "mbPerSecond": round(total_bytes / 1e6 / seconds, 3) if seconds > 0 else 0.0,
        "hiddenObjects": sum(1 for o in objects if is_hidden(o.key.removeprefix(spec.raw_prefix))),
        "rawDigest": raw_digest((o.key, o.etag) for o in objects),
    }
    return StageResult(outputs=list(OUTPUTS), counts=counts, metrics=metrics, versions=versions)
