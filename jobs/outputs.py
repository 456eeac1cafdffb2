"""A stage output is one object (`corpus.parquet`, the python engine) or a folder of part objects
(`corpus.parquet/part-00000-….parquet`, written by Spark's executors, globally sorted so the parts in
name order are the rows in order). Readers go through these functions and see the same rows either way."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from latentmas.store import ObjectStore


def part_keys(store: ObjectStore, bucket: str, key: str) -> list[str]:
    """The object `key` itself, else its part objects in order; a one-line error when neither exists."""
    if store.exists(bucket, key):
        return [key]
    parts = sorted(o.key for o in store.list(bucket, key + "/") if o.key.rsplit("/", 1)[-1].startswith("part-"))
    if not parts and not store.exists(bucket, key + "/_SUCCESS"):
        raise FileNotFoundError(f"{bucket}/{key} is missing (neither an object nor a folder of parts)")
    return parts


def read_parquet(
    store: ObjectStore, bucket: str, key: str, columns: list[str] | None = None, schema: pa.Schema | None = None
) -> pa.Table:
    """All rows of a parquet output; `schema` types an output with no parts at all (an empty result)."""
    keys = part_keys(store, bucket, key)
    tables = [pq.read_table(io.BytesIO(store.get_bytes(bucket, k)), columns=columns) for k in keys]
    if not tables:
        empty = pa.Table.from_pylist([], schema) if schema is not None else pa.table({})
        return empty.select(columns) if columns and schema is not None else empty
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def iter_jsonl(store: ObjectStore, bucket: str, key: str) -> Iterator[dict[str, Any]]:
    """The rows of a JSON-lines output, one part in memory at a time; a bad line is a one-line error."""
    for part in part_keys(store, bucket, key):
        for number, line in enumerate(store.get_bytes(bucket, part).decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise RuntimeError(f"{bucket}/{part}: line {number} is not JSON ({err.msg})") from err
