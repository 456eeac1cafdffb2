"""Large raw objects are cleaned in bounded memory: read in blocks, decoded incrementally, cut into
part documents at paragraph boundaries (the same parts whatever the block size, so the Spark engine,
which holds the object, gets them too), and the python engine spills documents to disk."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from latentmas.jobs.clean import clean_python
from latentmas.jobs.cleaning import RawRecord, parse_object, parse_stream
from latentmas.jobs.parts import BLOCK_BYTES, PART_CHARS, STREAM_BYTES, blocks_of
from latentmas.spec import CleaningSpec
from latentmas.stage import run_stage
from latentmas.store import LocalStore
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import stage_config, stage_key

pytestmark = pytest.mark.data
REPO = Path(__file__).resolve().parents[2]


def big_text(chars: int, seed: int = 1) -> str:
    """Paragraphs of random words (Latin and Cyrillic, so UTF-8 characters straddle block edges)."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"word{i}" for i in range(30000)] + [f"слово{i}" for i in range(30000)])
    parts, size = [], 0
    while size < chars:
        words = rng.choice(vocab, size=120)
        paragraph = ". ".join(" ".join(words[i : i + 12]) for i in range(0, 120, 12)) + ".\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)


def test_parts_are_the_same_whatever_the_block_size() -> None:
    text = big_text(5 * PART_CHARS)
    data = text.encode()
    assert len(data) > STREAM_BYTES
    whole = parse_object("docs/big.txt", data)
    streamed = list(parse_stream("docs/big.txt", len(data), blocks_of(data, 7777)))
    assert streamed == whole
    records = [r for r in whole if isinstance(r, RawRecord)]
    assert [r.source for r in records] == [f"docs/big.txt#p{i:05d}" for i in range(1, len(records) + 1)]
    assert len(records) >= 5 and all(len(r.text) <= PART_CHARS for r in records)
    assert "".join(r.text for r in records) == text  # nothing lost or repeated at the cuts
    assert all(r.text.endswith("\n\n") for r in records[:-1])  # cut at paragraph ends
    assert {r.encoding for r in records} == {"utf-8"}
    # Small objects stay one document.
    assert [r.source for r in parse_object("docs/small.txt", text[:5000].encode())] == ["docs/small.txt"]


def measure(megabytes: int) -> dict[str, float]:
    """Runs in a subprocess: the python engine's clean of one text object of `megabytes` in the
    folder store, with its peak traced allocation."""
    root = Path(tempfile.mkdtemp(prefix="clean-mem-"))
    store = LocalStore(root)
    store.ensure_bucket("raw")
    text = big_text(megabytes * 1_000_000, seed=megabytes)
    store.put_bytes("raw", "big/file.txt", text.encode())
    size = store.stat("raw", "big/file.txt").size
    del text
    tracemalloc.start()
    out = clean_python([("big/file.txt", size, store.iter_bytes("raw", "big/file.txt", BLOCK_BYTES))],
                       CleaningSpec(), root)  # fmt: skip
    documents = sum(1 for _ in out.docs())
    peak = tracemalloc.get_traced_memory()[1]
    return {"bytes": size, "documents": documents, "peak": peak}


def run_measure(megabytes: int) -> dict[str, float]:
    code = f"import json; from tests.data.test_large_objects import measure; print(json.dumps(measure({megabytes})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_clean_memory_is_bounded_by_the_part_size_not_the_file_size() -> None:
    small, large = run_measure(4), run_measure(12)
    print(f"peak traced memory: 4 MB -> {small['peak'] / 1e6:.1f} MB, 12 MB -> {large['peak'] / 1e6:.1f} MB")
    assert large["documents"] > 2.5 * small["documents"]  # three times the text, three times the parts
    bound = 256 * PART_CHARS  # 64 MiB, documented in docs/data.md
    assert small["peak"] < bound and large["peak"] < bound
    assert large["peak"] < 1.25 * small["peak"], "peak memory grows with the file size"


def test_stage_streams_a_large_object_from_minio(minio: MinioFixture) -> None:
    prefix = "large-obj/"
    text = big_text(6 * PART_CHARS, seed=5)
    minio.store.put_bytes("raw", f"{prefix}docs/big.md", ("# Big\n\n" + text).encode())
    config = stage_config(minio.storage, "large", {"cleaning": {"engine": "python", "rawPrefix": prefix}})
    manifest = run_stage("clean", config, minio.store)
    key = stage_key("large", "clean", "corpus.parquet")
    corpus = pq.read_table(io.BytesIO(minio.store.get_bytes("artifacts", key)))
    sources = corpus.column("source").to_pylist()
    assert sources == [f"{prefix}docs/big.md#p{i:05d}" for i in range(1, len(sources) + 1)]
    assert len(sources) >= 2 and manifest["counts"]["documents"] == len(sources)
    assert corpus.column("title").to_pylist()[0] == "Big"
