"""The clean stage: raw objects -> cleaned corpus, RAG chunks, per-document metrics and a quarantine.

Two engines, one result: `python` runs the shared per-document functions in-process (small data, the
local demo; large objects streamed in parts, documents spilled to disk); `spark` runs the same
functions inside Spark tasks and does dedupe with Spark SQL and a banded MinHash join (scale,
in-cluster); both keep the same documents (`latentmas.jobs.minhash`). The python engine stages its
outputs in the workdir and uploads one object each; Spark's executors write each output as a folder of
part objects (`latentmas.jobs.outputs` reads either form). Both finish before the manifest.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from latentmas.cycle import raw_digest
from latentmas.jobs.cleaning import METRIC_NAMES, CleanDoc, Rejected, is_hidden, near_detail, process_stream
from latentmas.jobs.minhash import dedupe
from latentmas.jobs.outputs import iter_jsonl, read_parquet
from latentmas.jobs.parts import BLOCK_BYTES
from latentmas.jobs.spill import DocSpill
from latentmas.spec import CleaningSpec
from latentmas.stage import StageContext, StageResult
from latentmas.store import ObjectInfo

ROW_GROUP = 256  # documents per parquet row group written by the python engine
RawObject = tuple[str, int, Iterable[bytes]]  # key, size, its bytes in blocks
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
        ("encoding", pa.string()),
    ]
)
METRICS_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("domain", pa.string())] + [(m, pa.float64()) for m in METRIC_NAMES]
)


@dataclass
class CleanOutput:
    """The python engine's result: the cleaned documents spilled to disk, those dropped as
    duplicates, and every rejected record (sorted by source, as the Spark engine writes them)."""

    spill: DocSpill
    dropped: set[str]
    rejected: list[Rejected]

    def docs(self) -> Iterator[CleanDoc]:
        """The kept documents, in source order, one at a time."""
        return (d for d in self.spill.docs() if d.source not in self.dropped)


def list_raw(ctx: StageContext, prefix: str) -> list[ObjectInfo]:
    """The raw objects to clean; a one-line error when the bucket or prefix is missing or empty."""
    if not ctx.store.bucket_exists(ctx.raw_bucket):
        raise RuntimeError(f"raw bucket {ctx.raw_bucket!r} does not exist")
    objects = sorted(ctx.store.list(ctx.raw_bucket, prefix), key=lambda o: o.key)
    if not objects:
        raise RuntimeError(f"raw bucket {ctx.raw_bucket!r} has no objects under prefix {prefix!r}")
    return objects


def resolve_duplicates(spill: DocSpill, threshold: float) -> tuple[set[str], list[Rejected]]:
    """Exact duplicates (same text hash), then near duplicates (banded MinHash LSH, query-then-insert in
    source order: a document similar to an already kept one is dropped). Streams the spill."""
    first: dict[str, str] = {}
    domains: dict[str, str] = {}
    rejected: list[Rejected] = []

    def unique() -> Iterator[tuple[str, list[int]]]:
        for source, domain, content_hash, shingles in spill.hashes():
            domains[source] = domain
            if content_hash in first:
                rejected.append(Rejected(source, domain, "exact_duplicate", f"same text as {first[content_hash]}"))
            else:
                first[content_hash] = source
                yield source, shingles

    near = dedupe(unique(), threshold, lookup=spill.shingles).dropped
    for source, (kept, similarity) in near.items():
        rejected.append(Rejected(source, domains[source], "near_duplicate", near_detail(kept, similarity)))
    return {r.source for r in rejected}, rejected


def clean_python(objects: Iterable[RawObject], spec: CleaningSpec, workdir: Path) -> CleanOutput:
    """Reads each object in blocks (large text in parts), spills the cleaned documents to
    `workdir`, then dedupes them; memory holds one part and the dedupe index, not the corpus."""
    spill = DocSpill(workdir / "spill.sqlite")
    rejected: list[Rejected] = []
    for key, size, blocks in objects:
        for item in process_stream(key, size, blocks, spec):
            if isinstance(item, CleanDoc):
                spill.add(item)
            else:
                rejected.append(item)
    spill.commit()
    dropped, duplicates = resolve_duplicates(spill, spec.near_duplicate_threshold)
    return CleanOutput(spill, dropped, sort_rejected(rejected + duplicates))


def sort_rejected(rows: Iterable[Rejected]) -> list[Rejected]:
    return sorted(rows, key=lambda r: (r.source, r.reason))


def write_python_outputs(ctx: StageContext, out: CleanOutput) -> None:
    """Writes every output to the workdir first (parquet in row groups, JSONL line by line, the
    documents streamed from the spill), then uploads them (no half-written object)."""
    folder = ctx.workdir / "clean"
    folder.mkdir(parents=True, exist_ok=True)
    with (
        pq.ParquetWriter(folder / CORPUS, CORPUS_SCHEMA) as corpus,
        pq.ParquetWriter(folder / METRICS, METRICS_SCHEMA) as metrics,
        (folder / CHUNKS).open("w", encoding="utf-8") as chunks,
    ):
        for batch in batched(out.docs(), ROW_GROUP):
            corpus.write_table(pa.Table.from_pylist([corpus_row(d) for d in batch], CORPUS_SCHEMA))
            rows = [{"doc_id": d.doc_id, "domain": d.domain, **d.metrics} for d in batch]
            metrics.write_table(pa.Table.from_pylist(rows, METRICS_SCHEMA))
            for doc in batch:
                for chunk in doc.chunks:
                    chunks.write(json.dumps(chunk.as_dict(), ensure_ascii=False) + "\n")
    write_jsonl(folder / QUARANTINE, (r.as_dict() for r in out.rejected))
    for name in OUTPUTS:
        ctx.store.put_file(ctx.bucket, ctx.key(name), folder / name)


def batched(items: Iterable[CleanDoc], size: int) -> Iterator[list[CleanDoc]]:
    batch: list[CleanDoc] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def corpus_row(d: CleanDoc) -> dict[str, Any]:
    return {"doc_id": d.doc_id, "domain": d.domain, "source": d.source, "format": d.fmt, "title": d.title,
            "text": d.text, "chars": len(d.text), "content_hash": d.content_hash, "encoding": d.encoding}  # fmt: skip


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def count_outputs(ctx: StageContext, objects: int) -> dict[str, int]:
    """Counts read back from the published outputs, so both engines report them the same way."""
    metrics = read_parquet(ctx.store, ctx.bucket, ctx.key(METRICS), ["domain", "chunk_count"], METRICS_SCHEMA)
    domains = Counter(metrics.column("domain").to_pylist())
    reasons = Counter(row["reason"] for row in iter_jsonl(ctx.store, ctx.bucket, ctx.key(QUARANTINE)))
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
    outputs = list(OUTPUTS)
    cluster: dict[str, Any] = {}
    if spec.engine == "spark":
        from latentmas.jobs.clean_spark import clean_spark

        spark_run = clean_spark(ctx, spec, objects)
        versions, outputs, cluster = spark_run.versions, spark_run.outputs, spark_run.cluster
    else:
        raw = ((o.key, o.size, ctx.store.iter_bytes(ctx.raw_bucket, o.key, BLOCK_BYTES)) for o in objects)
        out = clean_python(raw, spec, ctx.workdir)
        ctx.progress(1, 3, phase="cleaned", dropped=len(out.dropped), rejected=len(out.rejected))
        write_python_outputs(ctx, out)
        out.spill.close()
    counts = count_outputs(ctx, len(objects))
    seconds = time.monotonic() - clock
    ctx.progress(3, 3, phase="written", **counts)
    metrics: dict[str, Any] = {
        "engine": spec.engine,
        "inputs": {"bucket": ctx.raw_bucket, "prefix": spec.raw_prefix, "objects": len(objects), "bytes": total_bytes},
        "seconds": round(seconds, 3),
        "mbPerSecond": round(total_bytes / 1e6 / seconds, 3) if seconds > 0 else 0.0,
        "hiddenObjects": sum(1 for o in objects if is_hidden(o.key.removeprefix(spec.raw_prefix))),
        "rawDigest": raw_digest((o.key, o.etag) for o in objects),
    }
    if cluster:
        metrics["spark"] = cluster
    return StageResult(outputs=outputs, counts=counts, metrics=metrics, versions=versions)
