"""Shared set-up for the data-plane tests: a subset of the committed sample corpus in the real MinIO,
stage configs per cycle, and one python-engine clean run reused by the downstream stages."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from latentmas.jobs.corpus import default_corpus_dir, upload_corpus
from latentmas.jobs.outputs import iter_jsonl
from latentmas.spec import LatentMASStackSpec, StorageSpec
from latentmas.stage import StageConfig, run_stage
from latentmas.store import ObjectStore
from latentmas.testing.fixtures import MinioFixture

# A dirty cross-section: every format, exact and near duplicates, cp1252, empty, binary, symbols,
# a broken JSONL line, a CSV without a text column, an unsupported file.
SUBSET = [
    "python/codecs-notes-cp1252.txt", "python/html.md", "python/bisect.html", "python/heapq.txt", "python/textwrap.txt",
    "linux/ls.txt", "linux/ls-copy.txt", "linux/ls-edited.txt", "linux/empty.txt", "linux/core-dump.txt",
    "linux/ascii-art.txt", "linux/wc.html", "linux/head.txt",
    "licenses/debian-BSD.txt", "licenses/debian-Artistic.txt", "licenses/pypi-click-8.5.1.md", "licenses/index.json",
    "math/problems-1.jsonl", "math/scores.csv", "math/short.txt", "math/blank.md", "math/worked-examples.md",
]  # fmt: skip
DOMAINS = ["python", "linux", "licenses", "math"]
# Large files cut to their first lines so that embedding the chunks stays quick on a small CPU.
TRIM_LINES = {"math/problems-1.jsonl": 30, "math/worked-examples.md": 60}


def stage_config(storage: StorageSpec, cycle: str, pipeline: dict[str, Any] | None = None) -> StageConfig:
    spec = LatentMASStackSpec.model_validate(
        {
            "storage": storage.model_dump(by_alias=True),
            "experts": [{"name": d, "domain": d} for d in DOMAINS],
            "pipeline": pipeline or {},
        }
    )
    return StageConfig(stack="data-tests", cycle_id=cycle, spec=spec)


def upload_subset(store: ObjectStore, prefix: str, files: list[str] = SUBSET) -> list[str]:
    root = default_corpus_dir()
    for rel in files:
        data = (root / rel).read_bytes()
        if rel in TRIM_LINES:
            data = b"".join(data.splitlines(keepends=True)[: TRIM_LINES[rel]])
        store.put_bytes("raw", prefix + rel, data)
    return [prefix + rel for rel in files]


def read_jsonl(store: ObjectStore, key: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines output: one object, or the part objects Spark's executors write."""
    return list(iter_jsonl(store, "artifacts", key))


def written(store: ObjectStore, cycle: str, stage: str) -> list[str]:
    """Objects a stage wrote (its progress record aside): empty after a clean failure."""
    prefix = stage_key(cycle, stage, "")
    return [o.key for o in store.list("artifacts", prefix) if o.key != prefix + "_progress.json"]


def stage_key(cycle: str, stage: str, name: str) -> str:
    return f"default/data-tests/cycles/{cycle}/{stage}/{name}"


@pytest.fixture(scope="session")
def subset_prefix(minio: MinioFixture) -> str:
    # Fixed, so document ids (derived from object keys) and with them the held-out split are the same every run;
    # each session has its own MinIO, so nothing else writes here.
    prefix = "subset/"
    upload_subset(minio.store, prefix)
    return prefix


@pytest.fixture(scope="session")
def cleaned(minio: MinioFixture, subset_prefix: str) -> StageConfig:
    """The python-engine clean of the subset; quant, synth and index tests build on it."""
    config = stage_config(minio.storage, "chain", {"cleaning": {"engine": "python", "rawPrefix": subset_prefix}})
    run_stage("clean", config, minio.store)
    return config


@pytest.fixture(scope="session")
def full_corpus(minio: MinioFixture) -> str:
    prefix = f"full-{uuid.uuid4().hex[:6]}/"
    upload_corpus(minio.store, "raw", default_corpus_dir(), prefix)
    return prefix


def corpus_path(rel: str) -> Path:
    return default_corpus_dir() / rel
