"""Incremental indexing on real MinIO with the packaged MiniLM: after a promotion, the next cycle's
index stage embeds only the chunks of new or changed documents and reuses the promoted cycle's
vectors for the rest (keyed by text hash + embedder identity + chunking settings)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from latentmas.cycle import StageRun
from latentmas.jobs.corpus import default_corpus_dir
from latentmas.operator.stagejobs import stage_resources
from latentmas.registry import ArtifactEntry, ArtifactVersion, load_registry, save_registry
from latentmas.stage import StageConfig, run_stage
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import read_jsonl, stage_config

pytestmark = pytest.mark.data
STACK = "incremental"
FILES = ["python/heapq.txt", "linux/ls.txt", "linux/head.txt"]


def config(minio: MinioFixture, cycle: str, prefix: str, rag: dict | None = None) -> StageConfig:
    pipeline = {"cleaning": {"engine": "python", "rawPrefix": prefix}, "rag": {"evalQueries": 5, **(rag or {})}}
    return stage_config(minio.storage, cycle, pipeline).model_copy(update={"stack": STACK})


def key(cycle: str, stage: str, name: str) -> str:
    return f"default/{STACK}/cycles/{cycle}/{stage}/{name}"


def upload(minio: MinioFixture, prefix: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        minio.store.put_bytes("raw", prefix + rel, data)


def vectors(minio: MinioFixture, cycle: str) -> dict[str, np.ndarray]:
    table = pq.read_table(io.BytesIO(minio.store.get_bytes("artifacts", key(cycle, "index", "embeddings.parquet"))))
    return dict(
        zip(table.column("key").to_pylist(), table.column("vector").to_numpy(zero_copy_only=False), strict=True)
    )


def promote_index(minio: MinioFixture, cycle: str) -> None:
    """What the promote stage records for an index version: the cycle that built it."""
    registry = load_registry(minio.store, "artifacts", "default", STACK)
    entry = registry.index
    version = ArtifactVersion(
        version=entry.next_version(), prefix=f"default/{STACK}/registry/index/index/", files={}, cycle=cycle
    )
    updated = ArtifactEntry(current=version.version, history=[*entry.history, version])
    save_registry(minio.store, "artifacts", "default", STACK, registry.model_copy(update={"index": updated}))


def test_incremental_index_embeds_only_new_and_changed_documents(minio: MinioFixture) -> None:
    root = default_corpus_dir()
    first = {rel: (root / rel).read_bytes() for rel in FILES}
    upload(minio, "incr-a/", first)
    for stage in ("clean", "index"):
        run_stage(stage, config(minio, "a", "incr-a/"), minio.store)
    manifest_a = json.loads(minio.store.get_bytes("artifacts", key("a", "index", "_manifest.json")))
    chunks_a = read_jsonl(minio.store, key("a", "clean", "rag_chunks.jsonl"))
    assert manifest_a["metrics"]["embedding"] == {
        "device": "cpu",
        "embedded": len({c["text"] for c in chunks_a}),
        "reused": 0,
    }

    # Promote cycle a, then add one document and change another.
    promote_index(minio, "a")
    second = {**first, "python/textwrap.txt": (root / "python/textwrap.txt").read_bytes()}
    second["linux/head.txt"] = first["linux/head.txt"] + b"\n\nA closing paragraph added in the second cycle.\n"
    upload(minio, "incr-b/", second)
    for stage in ("clean", "index"):
        run_stage(stage, config(minio, "b", "incr-b/"), minio.store)
    chunks_b = read_jsonl(minio.store, key("b", "clean", "rag_chunks.jsonl"))
    old_texts = {c["text"] for c in chunks_a}
    new_texts = {c["text"] for c in chunks_b} - old_texts
    assert new_texts and any(c["source"].endswith("textwrap.txt") for c in chunks_b if c["text"] in new_texts)
    assert all(c["source"].endswith(("textwrap.txt", "head.txt")) for c in chunks_b if c["text"] in new_texts)
    manifest_b = json.loads(minio.store.get_bytes("artifacts", key("b", "index", "_manifest.json")))
    embedding = manifest_b["metrics"]["embedding"]
    assert embedding["embedded"] == len(new_texts)
    assert embedding["reused"] == len({c["text"] for c in chunks_b} & old_texts) > 0
    # Reused vectors are the promoted ones; the saved set is exactly this cycle's chunks.
    before, after = vectors(minio, "a"), vectors(minio, "b")
    shared = set(before) & set(after)
    assert len(shared) == embedding["reused"] and all(np.array_equal(before[k], after[k]) for k in shared)
    assert len(after) == len({c["text"] for c in chunks_b})

    # Another embedder identity (here: other chunking settings) reuses nothing.
    upload(minio, "incr-c/", second)
    other = config(minio, "c", "incr-c/")
    other.spec.pipeline.cleaning.chunk_overlap = 100
    for stage in ("clean", "index"):
        run_stage(stage, other, minio.store)
    manifest_c = json.loads(minio.store.get_bytes("artifacts", key("c", "index", "_manifest.json")))
    assert manifest_c["metrics"]["embedding"]["reused"] == 0


def test_index_becomes_a_gpu_stage_when_the_spec_asks(minio: MinioFixture) -> None:
    spec = config(minio, "gpu", "incr-gpu/", {"gpu": 1}).spec
    assert stage_resources(spec, StageRun("index")).gpu == 1
    assert stage_resources(config(minio, "cpu", "incr-cpu/").spec, StageRun("index")).gpu == 0
