"""How the Spark clean reads raw objects into item rows (documents and rejected records).

Objects up to LINE_READ_BYTES are read whole, one `binaryFile` row each, many packed into one task.
Larger ones are read as lines by Spark's text source, cut at `\\n` into splits of
`spark.sql.files.maxPartitionBytes` read by many tasks, so no executor holds a large object as one
row. Each line comes back as its raw bytes (the string column cast to binary keeps the bytes
verbatim, whatever the encoding) with its object's path and size and the start of its split.

- JSONL, the line-oriented format, is parsed in the tasks that read it. Two passes give the python
  engine's rows exactly: the first counts each split's lines (as `str.splitlines` counts them in the
  candidate encodings) and checks UTF-8 validity and blankness; the driver settles each object's
  encoding the way the whole-object decode does (`encoding.settle`: the head it read, plus validity)
  and numbers the splits; the second parses every line with its number (`cleaning.jsonl_record`).
- The other formats are cut sequentially (text parts, CSV rows spanning lines, HTML): their lines go
  through a shuffle to one task per object, sorted back into order, and feed the python engine's
  streaming parse (`process_stream`) as blocks, so text and Markdown stay bounded (parts of
  PART_CHARS); formats parsed whole are refused above WHOLE_OBJECT_BYTES in one line.

Cutting at the byte 0x0A is sound for UTF-8 and every legacy encoding `detect` names (none has it
inside a multi-byte character); UTF-16/32 objects (with their BOM) take the sequential path."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from latentmas.jobs.cleaning import (
    METRIC_NAMES,
    CleanDoc,
    Rejected,
    classify,
    clean_record,
    is_streamed,
    jsonl_record,
    process_object,
    process_stream,
)
from latentmas.jobs.encoding import Undecodable, bom_encoding, detect, settle
from latentmas.jobs.minhash import doc_bands
from latentmas.jobs.parts import BLOCK_BYTES, STREAM_BYTES
from latentmas.spec import CleaningSpec
from latentmas.store import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from pyspark import RDD
    from pyspark.sql import DataFrame, SparkSession

# Larger objects are read as lines in many tasks (the environment may lower it: tests, small clusters).
LINE_READ_BYTES = int(os.environ.get("LATENTMAS_SPARK_LINE_READ_BYTES", STREAM_BYTES))
WHOLE_OBJECT_BYTES = 256 << 20  # largest object of a format parsed whole (HTML, CSV, UTF-16/32) Spark accepts
SPLITTABLE_BOMS = (None, "utf-8-sig")  # byte-order marks whose text may be cut at 0x0A
GLOB = str.maketrans({c: "\\" + c for c in "\\{}[]*?"})
Row = tuple[Any, ...]


def item_schema() -> Any:
    from pyspark.sql import types as T

    chunk = T.StructType([T.StructField("chunk_id", T.StringType()), T.StructField("text", T.StringType())])
    return T.StructType(
        [
            T.StructField("kind", T.StringType()),
            T.StructField("source", T.StringType()),
            T.StructField("domain", T.StringType()),
            T.StructField("reason", T.StringType()),
            T.StructField("detail", T.StringType()),
            T.StructField("doc_id", T.StringType()),
            T.StructField("format", T.StringType()),
            T.StructField("title", T.StringType()),
            T.StructField("text", T.StringType()),
            T.StructField("chars", T.LongType()),
            T.StructField("content_hash", T.StringType()),
            T.StructField("encoding", T.StringType()),
            T.StructField("metrics", T.ArrayType(T.DoubleType())),
            T.StructField("chunks", T.ArrayType(chunk)),
            T.StructField("shingles", T.ArrayType(T.IntegerType())),
            T.StructField("bands", T.ArrayType(T.LongType())),
        ]
    )


def item_row(item: CleanDoc | Rejected) -> Row:
    """A document (with shingles and band keys) or a rejected record as an `item_schema` row."""
    if isinstance(item, CleanDoc):
        return (
            "doc", item.source, item.domain, None, None, item.doc_id, item.fmt, item.title, item.text,
            len(item.text), item.content_hash, item.encoding, [item.metrics[m] for m in METRIC_NAMES],
            [(c.chunk_id, c.text) for c in item.chunks], item.shingles, doc_bands(item.shingles),
        )  # fmt: skip
    return ("rej", item.source, item.domain, item.reason, item.detail) + (None,) * 11


def to_rows(key: str, data: bytes, spec_json: str) -> Iterator[Row]:
    """Runs in a Spark task: one whole raw object -> its item rows."""
    spec = CleaningSpec.model_validate_json(spec_json)
    return (item_row(item) for item in process_object(key, data, spec))


# ---- what goes where (driver) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LineObject:
    """A large JSONL object parsed in many tasks: its key, domain, size and first BLOCK_BYTES."""

    key: str
    domain: str
    size: int
    head: bytes

    def candidates(self) -> tuple[str, ...]:
        """Encodings its lines are counted in: UTF-8 (also for a UTF-8 BOM) and, when the head is not
        UTF-8, the legacy code page `detect` names for it (used unless all of the object is UTF-8)."""
        try:
            guess = detect(self.head)
        except Undecodable:
            return ("utf-8",)
        return ("utf-8",) if guess.startswith("utf-8") else ("utf-8", guess)


@dataclass
class ReadPlan:
    """The large objects by how they are read; rejected ones (by key alone) are judged on the driver."""

    lines: list[LineObject] = field(default_factory=list)
    streamed: list[ObjectInfo] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def read_head(store: ObjectStore, bucket: str, key: str) -> bytes:
    """The first BLOCK_BYTES of an object (the encoding is detected from them), without reading the rest."""
    head = b""
    blocks = store.iter_bytes(bucket, key, BLOCK_BYTES)
    for block in blocks:
        head += block
        if len(head) >= BLOCK_BYTES:
            break
    getattr(blocks, "close", lambda: None)()
    return head[:BLOCK_BYTES]


def plan_reads(large: Sequence[ObjectInfo], spec: CleaningSpec, head: Callable[[str], bytes]) -> ReadPlan:
    """Sorts the large objects: JSONL (not UTF-16/32) into line splits, the rest into sequential
    streams; a format parsed whole above WHOLE_OBJECT_BYTES is refused in one line."""
    plan = ReadPlan()
    for info in large:
        kind = classify(info.key, spec.raw_prefix)
        if isinstance(kind, Rejected):
            plan.rejected.append(kind)
            continue
        domain, fmt = kind
        if fmt == "jsonl" and bom_encoding(first := head(info.key)) in SPLITTABLE_BOMS:
            plan.lines.append(LineObject(info.key, domain, info.size, first))
        elif is_streamed(fmt, info.size) or info.size <= WHOLE_OBJECT_BYTES:
            plan.streamed.append(info)
        else:
            raise RuntimeError(
                f"raw object {info.key!r} is {info.size} bytes: {fmt} objects are parsed whole and the spark "
                f"engine takes at most {WHOLE_OBJECT_BYTES} bytes of them; split it into smaller objects"
            )
    return plan


# ---- reading lines (Spark) ------------------------------------------------------------------------------
def read_lines(spark: SparkSession, bucket_uri: str, keys: Sequence[str]) -> DataFrame:
    """Every `\\n`-separated line of the objects (raw bytes, without the separator) with its object's
    path (URL-encoded, as Spark names files) and size and the start of the split it was read in."""
    from pyspark.sql import functions as F

    paths = [bucket_uri + key.translate(GLOB) for key in keys]  # literal names, not glob patterns
    return (
        spark.read.option("lineSep", "\n")
        .text(paths)
        .select(
            F.col("_metadata.file_path").alias("path"),
            F.col("_metadata.file_size").alias("size"),
            F.col("_metadata.file_block_start").alias("start"),
            F.col("value").cast("binary").alias("line"),
        )
    )


def key_of(path: str, bucket_uri: str) -> str:
    return unquote(path).removeprefix(bucket_uri)


def decode_line(line: bytes, encoding: str, first: bool) -> str:
    """One line and its separator decoded as the whole object would be (a UTF-8 BOM only at its start)."""
    if encoding == "utf-8-sig" and not first:
        encoding = "utf-8"
    return (line + b"\n").decode(encoding, errors="replace")


@dataclass(frozen=True)
class SplitStats:
    """One split of a line-read object: its lines per candidate encoding, whether it holds anything but
    ASCII whitespace, whether it is valid UTF-8, and its bytes (lines plus separators)."""

    key: str
    start: int
    lines: dict[str, int]
    nonblank: bool
    utf8: bool
    size: int


def split_stats(rows: Iterable[Any], bucket_uri: str, candidates: dict[str, tuple[str, ...]]) -> Iterator[SplitStats]:
    """Runs in a Spark task (the first pass): the stats of each split it read."""
    for (path, start), group in itertools.groupby(rows, key=lambda row: (row.path, row.start)):
        key = key_of(path, bucket_uri)
        encodings = candidates[key]
        lines = dict.fromkeys(encodings, 0)
        nonblank, utf8, size = False, True, 0
        for index, row in enumerate(group):
            data = bytes(row.line)
            size += len(data) + 1
            nonblank = nonblank or bool(data.strip())
            for encoding in encodings:
                lines[encoding] += len(decode_line(data, encoding, start == 0 and index == 0).splitlines())
            if utf8:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    utf8 = False
        yield SplitStats(key, start, lines, nonblank, utf8, size)


@dataclass(frozen=True)
class Numbered:
    """A line-read object to parse: its domain and settled encoding, and the number of its first line
    in each split (keyed by the split's start)."""

    domain: str
    encoding: str
    first_line: dict[int, int]


def number_splits(obj: LineObject, splits: Sequence[SplitStats]) -> Numbered | Rejected:
    """The driver's decision between the passes: the object's encoding as the whole-object decode
    settles it, and its splits numbered in order; or why the object is rejected (empty, undecodable)."""
    read = sum(s.size for s in splits)
    if read not in (obj.size, obj.size + 1):  # the last line may have no separator
        raise RuntimeError(f"raw object {obj.key!r}: the line splits hold {read} bytes of its {obj.size}")
    if not any(s.nonblank for s in splits):
        return Rejected(obj.key, obj.domain, "empty", f"{obj.size} bytes, no text")
    try:
        encoding = settle(obj.head, all(s.utf8 for s in splits))
    except Undecodable as err:
        return Rejected(obj.key, obj.domain, "undecodable", str(err))
    counted = "utf-8" if encoding.startswith("utf-8") else encoding
    first_line, number = {}, 1
    for split in sorted(splits, key=lambda s: s.start):
        first_line[split.start] = number
        number += split.lines[counted]
    return Numbered(obj.domain, encoding, first_line)


def parse_splits(rows: Iterable[Any], bucket_uri: str, plans: dict[str, Numbered], spec_json: str) -> Iterator[Row]:
    """Runs in a Spark task (the second pass): every line of the splits it read, numbered, parsed and cleaned."""
    spec = CleaningSpec.model_validate_json(spec_json)
    for (path, start), group in itertools.groupby(rows, key=lambda row: (row.path, row.start)):
        key = key_of(path, bucket_uri)
        plan = plans.get(key)
        if plan is None:  # rejected whole on the driver
            continue
        number = plan.first_line[start]
        for index, row in enumerate(group):
            for line in decode_line(bytes(row.line), plan.encoding, start == 0 and index == 0).splitlines():
                record = jsonl_record(key, plan.domain, number, line, plan.encoding)
                number += 1
                if record is not None:
                    yield item_row(record if isinstance(record, Rejected) else clean_record(record, spec))


def object_blocks(key: str, size: int, rows: Iterable[Any]) -> Iterator[bytes]:
    """An object's bytes again from its lines in order: each line and the separator that followed it."""
    read = 0
    for row in rows:
        data = bytes(row.line)
        read += len(data)
        yield data
        if read < size:  # a separator follows (the last line may have none)
            read += 1
            yield b"\n"
    if read != size:
        raise RuntimeError(f"raw object {key!r}: read {read} of its {size} bytes as lines")


def with_size(lines: Iterator[Any]) -> tuple[int, Iterator[Any]]:
    """The object size its first line carries, and all the lines."""
    first = next(lines)
    return int(first.size), itertools.chain([first], lines)


def stream_objects(rows: Iterable[Any], bucket_uri: str, spec_json: str) -> Iterator[Row]:
    """Runs in a Spark task: the lines of whole objects, sorted back into order, fed as blocks to the
    python engine's streaming parse (one part in memory at a time for text and Markdown)."""
    spec = CleaningSpec.model_validate_json(spec_json)
    for path, group in itertools.groupby(rows, key=lambda row: row.path):
        size, lines = with_size(group)
        key = key_of(path, bucket_uri)
        blocks = object_blocks(key, size, lines)
        yield from (item_row(item) for item in process_stream(key, size, blocks, spec))


@dataclass
class LineRead:
    """The item rows of the large objects (one RDD per read path), those rejected on the driver
    between the passes, and what was read how (reported in the manifest)."""

    rdds: list[RDD[Row]]
    rejected: list[Rejected]
    facts: dict[str, Any]


def line_items(spark: SparkSession, bucket_uri: str, plan: ReadPlan, spec_json: str) -> LineRead:
    """Reads the large objects of `plan`: JSONL in two passes over its line splits, the rest streamed."""
    from pyspark.sql import functions as F

    read = LineRead([], [], {"lineObjects": len(plan.lines), "streamedObjects": len(plan.streamed), "lineSplits": {}})
    if plan.lines:
        candidates = {obj.key: obj.candidates() for obj in plan.lines}
        lines = read_lines(spark, bucket_uri, [obj.key for obj in plan.lines])
        stats = lines.rdd.mapPartitions(lambda rows: split_stats(rows, bucket_uri, candidates)).collect()
        plans: dict[str, Numbered] = {}
        for obj in plan.lines:
            splits = [s for s in stats if s.key == obj.key]
            read.facts["lineSplits"][obj.key] = len(splits)
            numbered = number_splits(obj, splits)
            if isinstance(numbered, Rejected):
                read.rejected.append(numbered)
            else:
                plans[obj.key] = numbered
        read.rdds.append(lines.rdd.mapPartitions(lambda rows: parse_splits(rows, bucket_uri, plans, spec_json)))
    if plan.streamed:
        ordered = (
            read_lines(spark, bucket_uri, [o.key for o in plan.streamed])
            .withColumn("seq", F.monotonically_increasing_id())  # the read order within a split
            .repartition(len(plan.streamed), "path")
            .sortWithinPartitions("path", "start", "seq")
        )
        read.rdds.append(ordered.rdd.mapPartitions(lambda rows: stream_objects(rows, bucket_uri, spec_json)))
    return read
