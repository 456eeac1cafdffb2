"""Near-duplicate detection: banded MinHash LSH with query-then-insert in key order, the same bands
and decisions in the python and the Spark engine (parity on the bundled corpus)."""

from __future__ import annotations

import itertools

import pytest
from latentmas.jobs.cleaning import shingles
from latentmas.jobs.minhash import (
    BANDS,
    dedupe,
    doc_bands,
    greedy_keep,
    is_similar,
    jaccard,
    near_duplicate_families,
)
from latentmas.jobs.outputs import read_parquet
from latentmas.stage import run_stage
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import read_jsonl, stage_config, stage_key

pytestmark = pytest.mark.data


def all_pairs(items: list[tuple[str, list[int]]], threshold: float) -> dict[str, list[tuple[str, float]]]:
    """Exact similar pairs by comparing every pair (the reference the banding must not miss)."""
    similar: dict[str, list[tuple[str, float]]] = {}
    for (a, sa), (b, sb) in itertools.combinations(sorted(items), 2):
        if is_similar(sa, sb, threshold):
            similar.setdefault(b, []).append((a, jaccard(sa, sb)))
    return similar


def test_query_then_insert_compares_with_kept_documents_only() -> None:
    a, b, c = list(range(0, 100)), list(range(10, 110)), list(range(20, 120))
    assert round(jaccard(a, b), 3) == round(jaccard(b, c), 3) == 0.818 and round(jaccard(a, c), 3) == 0.667
    result = dedupe([("c", c), ("a", a), ("b", b)], 0.8)
    # b duplicates the kept a and is dropped; c resembles only the dropped b, so it is kept.
    assert result.kept == ["a", "c"]
    assert result.dropped == {"b": ("a", pytest.approx(0.818, abs=1e-3))}
    assert result.similar == 1
    assert greedy_keep(["a", "b", "c"], all_pairs([("a", a), ("b", b), ("c", c)], 0.8)).kept == ["a", "c"]


def test_families_keep_one_document_each_and_banding_misses_no_pair() -> None:
    data = near_duplicate_families(families=30, variants=6)
    items = [(key, shingles(text)) for key, text in data]
    result = dedupe(items, 0.8)
    assert result.kept == [f"f{f:05d}/v000.txt" for f in range(30)]
    assert len(result.dropped) == 30 * 5 == result.similar
    assert all(kept.split("/")[0] == key.split("/")[0] for key, (kept, _) in result.dropped.items())
    reference = greedy_keep([k for k, _ in items], all_pairs(items, 0.8))
    assert (reference.kept, reference.dropped) == (result.kept, result.dropped)
    # Within a family every variant pair is a candidate; across families none is similar.
    exact = all_pairs(items, 0.8)
    assert sum(len(v) for v in exact.values()) == 30 * 15
    assert all(b.split("/")[0] == a.split("/")[0] for b, pairs in exact.items() for a, _ in pairs)


def test_band_keys_are_stable_and_band_specific() -> None:
    sig_input = shingles("the quick brown fox jumps over the lazy dog again and again")
    keys = doc_bands(sig_input)
    assert len(keys) == BANDS and len(set(keys)) == BANDS
    assert keys == doc_bands(list(sig_input))
    assert all(-(2**63) <= k < 2**63 for k in keys)


def kept_and_near(minio: MinioFixture, cycle: str) -> tuple[list[str], list[dict]]:
    corpus = read_parquet(minio.store, "artifacts", stage_key(cycle, "clean", "corpus.parquet"))
    near = [q for q in read_jsonl(minio.store, stage_key(cycle, "clean", "quarantine.jsonl"))
            if q["reason"] == "near_duplicate"]  # fmt: skip
    return corpus.column("source").to_pylist(), near


def test_engines_keep_the_same_documents_on_the_bundled_corpus(minio: MinioFixture, spark, full_corpus: str) -> None:
    results = {}
    for engine in ("python", "spark"):
        pipeline = {"cleaning": {"engine": engine, "rawPrefix": full_corpus}}
        manifest = run_stage("clean", stage_config(minio.storage, f"dedupe-{engine}", pipeline), minio.store)
        results[engine] = (kept_and_near(minio, f"dedupe-{engine}"), manifest["counts"])
    (py_kept, py_near), py_counts = results["python"]
    (spark_kept, spark_near), spark_counts = results["spark"]
    assert spark_kept == py_kept
    assert spark_near == py_near
    assert spark_counts == py_counts
    assert py_counts["quarantined_near_duplicate"] == len(py_near) > 20
    # Every near duplicate names a kept document with a smaller key.
    kept = set(py_kept)
    for row in py_near:
        other = row["detail"].split("similar to ", 1)[1].split(" (jaccard", 1)[0]
        assert other in kept and other < row["source"], row
