"""The clean stage on Spark: raw objects read with s3a, the shared per-document functions run in
Spark tasks, exact dedupe with a window over the text hash, near duplicates with a banded MinHash
join (the band keys computed in the tasks by `latentmas.jobs.minhash`, candidate pairs by a self-join
on band key, exact Jaccard with Spark array functions, then the python engine's query-then-insert
decision on the driver over the verified pairs). Each output is written by the executors as a folder
of part objects from a global sort (the same rows and order as the python engine's single object);
file and shuffle partitions are sized from the input (`partition_confs`) and adaptive execution
coalesces small shuffle partitions."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from latentmas.jobs.clean import CHUNKS, CORPUS, CORPUS_SCHEMA, METRICS, METRICS_SCHEMA, QUARANTINE
from latentmas.jobs.cleaning import METRIC_NAMES, Rejected, is_hidden, near_detail, process_object
from latentmas.jobs.minhash import greedy_keep
from latentmas.jobs.spark_reads import LINE_READ_BYTES, item_schema, line_items, plan_reads, read_head, to_rows
from latentmas.spec import CleaningSpec
from latentmas.stage import StageContext
from latentmas.store import ObjectInfo

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

CHUNK_FIELDS = ("chunk_id", "doc_id", "domain", "source", "text")
QUARANTINE_FIELDS = ("source", "domain", "reason", "detail")


def partition_confs(total_bytes: int, slots: int) -> dict[str, str]:
    """Partitions sized from the input: read splits give every task slot about four tasks (256 KB..128 MB
    each, many small objects packed into one task: a small per-object open cost instead of Spark's 4 MB,
    which would put each small object in a task of its own), shuffles start at ~64 MB a partition (at
    least two per slot) and adaptive execution coalesces what turns out smaller."""
    kb, mb = 1 << 10, 1 << 20
    split = min(max(total_bytes // max(4 * slots, 1), 256 * kb), 128 * mb)
    shuffle = max(2 * slots, -(-total_bytes // (64 * mb)))
    return {
        "spark.sql.files.maxPartitionBytes": str(split),
        "spark.sql.files.openCostInBytes": str(8 * kb),
        "spark.sql.shuffle.partitions": str(shuffle),
        "spark.sql.adaptive.advisoryPartitionSizeInBytes": str(64 * mb),
    }


def session(ctx: StageContext) -> SparkSession:
    from latentmas.spark import spark_session

    spark = spark_session(ctx.spec.storage, app_name=f"latentmas-clean-{ctx.config.cycle_id}", spec=ctx.spec)
    # Python workers must be this interpreter (the one with latentmas installed), not whatever `python3` is.
    spark.sparkContext.pythonExec = os.environ.get("PYSPARK_PYTHON", sys.executable)
    return spark


@dataclass
class SparkRun:
    """What a Spark clean reports: library versions, the part keys written, and where it ran."""

    versions: dict[str, str]
    outputs: list[str]
    cluster: dict[str, Any]


def cluster_facts(spark: SparkSession) -> dict[str, Any]:
    """The master, the executors that registered (the driver excluded) and the task slots."""
    context = spark.sparkContext
    executors = context._jsc.sc().getExecutorMemoryStatus().size()  # no public count of executors
    master = str(context.master)
    local = master.startswith("local[") or master == "local"
    return {"master": master, "executors": executors if local else executors - 1,
            "slots": context.defaultParallelism}  # fmt: skip


def clean_spark(ctx: StageContext, spec: CleaningSpec, objects: Sequence[ObjectInfo]) -> SparkRun:
    """Runs the stage on Spark; returns the versions, the output keys (part objects) and the cluster."""
    import pyspark
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    spark = session(ctx)
    for key, value in partition_confs(sum(o.size for o in objects), spark.sparkContext.defaultParallelism).items():
        spark.conf.set(key, value)
    bucket_uri = f"s3a://{ctx.raw_bucket}/"
    spec_json = spec.model_dump_json()
    # Spark's file listing skips hidden names and empty files: those objects are judged on the driver.
    unlisted = [o.size == 0 or is_hidden(o.key.removeprefix(spec.raw_prefix)) for o in objects]
    unread = [
        item
        for o, skipped in zip(objects, unlisted, strict=True)
        if skipped
        for item in process_object(o.key, b"", spec)
        if isinstance(item, Rejected)
    ]
    listed = [o for o, skipped in zip(objects, unlisted, strict=True) if not skipped]
    plan = plan_reads(
        [o for o in listed if o.size > LINE_READ_BYTES], spec, lambda key: read_head(ctx.store, ctx.raw_bucket, key)
    )
    large = line_items(spark, bucket_uri, plan, spec_json)
    unread += plan.rejected + large.rejected
    whole = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(bucket_uri + spec.raw_prefix)
        .filter(F.col("length") <= LINE_READ_BYTES)  # pushed down: larger objects are not read whole
        .select("path", "content")
        .rdd.flatMap(lambda row: to_rows(unquote(row.path).removeprefix(bucket_uri), bytes(row.content), spec_json))
    )
    items = spark.sparkContext.union([whole, *large.rdds]).toDF(item_schema()).persist()
    ctx.progress(1, 3, phase="parsed")
    docs = items.filter(F.col("kind") == "doc")
    by_hash = Window.partitionBy("content_hash").orderBy("source")
    docs = docs.withColumn("first_source", F.first("source").over(by_hash)).persist()
    unique = docs.filter(F.col("source") == F.col("first_source")).drop("first_source")
    exact = docs.filter(F.col("source") != F.col("first_source")).select(
        "source",
        "domain",
        F.lit("exact_duplicate").alias("reason"),
        F.concat(F.lit("same text as "), "first_source").alias("detail"),
    )

    nearest = near_duplicates(spark, unique, spec.near_duplicate_threshold).persist()
    detail = F.udf(near_detail, T.StringType())
    near = unique.join(nearest, unique.source == nearest.b).select(
        "source", "domain", F.lit("near_duplicate").alias("reason"), detail("a", "jaccard").alias("detail")
    )
    kept = unique.join(nearest, unique.source == nearest.b, "left_anti").persist()

    unread_schema = ", ".join(f"{f} string" for f in QUARANTINE_FIELDS)
    unread_df = spark.createDataFrame([r.as_dict() for r in unread], schema=unread_schema)
    rejected = (
        items.filter(F.col("kind") == "rej")
        .select(*QUARANTINE_FIELDS)
        .unionByName(exact)
        .unionByName(near)
        .unionByName(unread_df)
    )
    corpus = kept.select("doc_id", "domain", "source", "format", "title", "text", "chars", "content_hash", "encoding")
    metrics = kept.select(
        "source", "doc_id", "domain", *[F.col("metrics")[i].alias(m) for i, m in enumerate(METRIC_NAMES)]
    )
    chunks = kept.select("doc_id", "domain", "source", F.explode("chunks").alias("c")).select(
        "c.chunk_id", "doc_id", "domain", "source", "c.text"
    )
    ctx.progress(2, 3, phase="writing")
    outputs = [
        *publish(ctx, corpus, "source", "parquet", CORPUS, empty_schema=CORPUS_SCHEMA),
        *publish(ctx, metrics, "source", "parquet", METRICS, "source", METRICS_SCHEMA),
        *publish(ctx, chunks, ["source", "chunk_id"], "json", CHUNKS),
        *publish(ctx, rejected, ["source", "reason"], "json", QUARANTINE),
    ]
    for frame in (items, docs, nearest, kept):
        frame.unpersist()
    return SparkRun({"spark": pyspark.__version__}, outputs, cluster_facts(spark) | {"reads": large.facts})


def similar_pairs(unique: DataFrame, threshold: float) -> DataFrame:
    """Verified pairs (a < b, jaccard) of documents sharing a band bucket: the banded join."""
    from pyspark.sql import functions as F

    banded = unique.select("source", "shingles", F.explode("bands").alias("band"))
    left, right = banded.alias("l"), banded.alias("r")
    candidates = (
        left.join(right, (F.col("l.band") == F.col("r.band")) & (F.col("l.source") < F.col("r.source")))
        .select(F.col("l.source").alias("a"), F.col("r.source").alias("b"), "l.shingles", "r.shingles")
        .dropDuplicates(["a", "b"])
    )
    jaccard = F.size(F.array_intersect("l.shingles", "r.shingles")) / F.size(F.array_union("l.shingles", "r.shingles"))
    return candidates.select("a", "b", jaccard.alias("jaccard")).filter(
        F.lit(1.0) - F.col("jaccard") < F.lit(1.0 - threshold)
    )


def near_duplicates(spark: SparkSession, unique: DataFrame, threshold: float) -> DataFrame:
    """(b, a, jaccard): each dropped document and the kept one it duplicates. The pairs come from the
    banded join; the keep/drop decision walks them in key order on the driver (`greedy_keep`), the
    same query-then-insert rule the python engine applies."""
    pairs = similar_pairs(unique, threshold).collect()
    similar: dict[str, list[tuple[str, float]]] = {}
    for row in pairs:
        similar.setdefault(row.b, []).append((row.a, float(row.jaccard)))
    keys = [row.source for row in unique.select("source").collect()]
    dropped = greedy_keep(keys, similar).dropped
    rows = [(b, a, j) for b, (a, j) in sorted(dropped.items())]
    return spark.createDataFrame(rows, "b string, a string, jaccard double")


def publish(
    ctx: StageContext,
    frame: DataFrame,
    order: str | list[str],
    fmt: str,
    name: str,
    drop: str | None = None,
    empty_schema: pa.Schema | None = None,
) -> list[str]:
    """The executors write `name/` as part objects of a global sort (a range-partitioned shuffle), so the
    parts in name order hold the rows in the python engine's order; nothing passes through the driver.
    Returns the part keys (relative to the stage prefix)."""
    ordered = frame.orderBy(*([order] if isinstance(order, str) else order))
    if drop:
        ordered = ordered.drop(drop)
    path = f"s3a://{ctx.bucket}/{ctx.key(name)}"
    if fmt == "parquet":
        ordered.write.mode("overwrite").parquet(path)
    else:
        ordered.write.mode("overwrite").option("ignoreNullFields", "false").json(path)
    stage = ctx.key("")
    parts = [o.key.removeprefix(stage) for o in ctx.store.list(ctx.bucket, ctx.key(name) + "/")]
    parts = sorted(p for p in parts if p.rsplit("/", 1)[-1].startswith("part-"))
    if parts:
        return parts
    # Spark may write no part at all for an empty result; publish an empty output of the same shape.
    ctx.store.put_bytes(ctx.bucket, ctx.key(name), b"" if empty_schema is None else empty_parquet(empty_schema))
    return [name]


def empty_parquet(schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([], schema), buffer)
    return buffer.getvalue()
