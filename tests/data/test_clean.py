"""The clean stage on real MinIO (and Spark): outputs, quarantine reasons, engine agreement, bad input."""

from __future__ import annotations

import functools
import io
import itertools
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from latentmas.jobs.cleaning import chunk_text, redact
from latentmas.jobs.outputs import iter_jsonl
from latentmas.jobs.outputs import read_parquet as stage_parquet
from latentmas.stage import MANIFEST, StageConfig, run_stage
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import SUBSET, read_jsonl, stage_config, stage_key, upload_subset, written

pytestmark = pytest.mark.data
CLI = Path(sys.executable).parent / "latentmas"


def read_parquet(minio: MinioFixture, key: str) -> list[dict]:
    return pq.read_table(io.BytesIO(minio.store.get_bytes("artifacts", key))).to_pylist()


def outputs(minio: MinioFixture, cycle: str) -> dict[str, list[dict]]:
    """Each output's rows in order, whether it is one object (python) or a folder of parts (Spark)."""
    key = functools.partial(stage_key, cycle, "clean")
    return {
        "corpus": stage_parquet(minio.store, "artifacts", key("corpus.parquet")).to_pylist(),
        "metrics": stage_parquet(minio.store, "artifacts", key("metrics.parquet")).to_pylist(),
        "chunks": list(iter_jsonl(minio.store, "artifacts", key("rag_chunks.jsonl"))),
        "quarantine": list(iter_jsonl(minio.store, "artifacts", key("quarantine.jsonl"))),
    }


def test_python_clean_outputs_and_quarantine(minio: MinioFixture, cleaned: StageConfig, subset_prefix: str) -> None:
    out = outputs(minio, "chain")
    manifest = json.loads(minio.store.get_bytes("artifacts", stage_key("chain", "clean", MANIFEST)))
    reasons = {(q["source"].removeprefix(subset_prefix), q["reason"]) for q in out["quarantine"]}
    assert {
        ("linux/ls.txt", "exact_duplicate"),
        ("linux/ls-edited.txt", "near_duplicate"),
        ("linux/empty.txt", "empty"),
        ("linux/core-dump.txt", "undecodable"),
        ("linux/ascii-art.txt", "symbol_ratio"),
        ("licenses/index.json", "unsupported_format"),
        ("math/scores.csv", "missing_column"),
        ("math/short.txt", "too_short"),
        ("math/blank.md", "empty"),
        ("math/problems-1.jsonl#6", "parse_error"),
    } <= reasons
    assert manifest["counts"]["quarantined"] == len(out["quarantine"])
    assert manifest["counts"]["documents"] == len(out["corpus"]) == len(out["metrics"])
    assert {d["domain"] for d in out["corpus"]} == {"python", "linux", "licenses", "math"}
    texts = " ".join(d["text"] for d in out["corpus"])
    assert "@example.com" not in texts and "[EMAIL]" in texts
    assert "555-0" not in texts and "555) " not in texts and "[PHONE]" in texts
    assert "Subscribe to our newsletter" not in texts and "<p>" not in texts and "analytics()" not in texts
    repaired = next(d for d in out["corpus"] if d["source"].endswith("codecs-notes-cp1252.txt"))
    assert "Café" in repaired["text"] and "naïve" in repaired["text"]
    assert {m["doc_id"] for m in out["metrics"]} == {d["doc_id"] for d in out["corpus"]}
    assert all(c["doc_id"] in {d["doc_id"] for d in out["corpus"]} for c in out["chunks"])
    assert sum(m["chunk_count"] for m in out["metrics"]) == len(out["chunks"])
    assert manifest["metrics"]["inputs"]["objects"] == len(SUBSET)


def test_pii_redaction_keeps_versions_and_sentences() -> None:
    text = "Mail ops7@example.net, call +1 555-013-2536. Mirror 192.0.2.7; see version 1.2.3.4.5 or (555) 201-0042."
    assert redact(text) == (
        "Mail [EMAIL], call [PHONE]. Mirror [IP]; see version 1.2.3.4.5 or [PHONE].",
        4,
    )


def test_rerun_is_noop(minio: MinioFixture, cleaned: StageConfig) -> None:
    key = stage_key("chain", "clean", "corpus.parquet")
    before = minio.store.stat("artifacts", key).etag
    manifest = json.loads(minio.store.get_bytes("artifacts", stage_key("chain", "clean", MANIFEST)))
    assert run_stage("clean", cleaned, minio.store) == manifest
    assert minio.store.stat("artifacts", key).etag == before


def test_chunking_is_sentence_aware_with_overlap() -> None:
    text = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(60))
    chunks = chunk_text(text, 200, 60)
    assert all(len(c) <= 200 for c in chunks) and len(chunks) > 5
    assert all(c.endswith(".") and c[0].isupper() for c in chunks)
    for first, second in itertools.pairwise(chunks):
        assert first.split(". ")[-1] in second, "consecutive chunks share their boundary sentence"


def test_spark_and_python_engines_agree(minio: MinioFixture, spark, cleaned: StageConfig, subset_prefix: str) -> None:
    config = stage_config(minio.storage, "spark-eq", {"cleaning": {"engine": "spark", "rawPrefix": subset_prefix}})
    manifest = run_stage("clean", config, minio.store)
    assert manifest["versions"]["spark"].startswith("3.5")
    spark_out, python_out = outputs(minio, "spark-eq"), outputs(minio, "chain")
    for name in ("corpus", "metrics", "chunks", "quarantine"):
        assert spark_out[name] == python_out[name], f"{name} differs between engines"
    python_manifest = json.loads(minio.store.get_bytes("artifacts", stage_key("chain", "clean", MANIFEST)))
    assert manifest["counts"] == python_manifest["counts"]
    parts = [o["key"] for o in manifest["outputs"]]
    assert all("/part-" in key for key in parts), parts


def test_missing_bucket_and_empty_prefix_are_one_line_errors(minio: MinioFixture, tmp_path) -> None:
    empty = stage_config(minio.storage, "empty", {"cleaning": {"rawPrefix": f"nothing-{uuid.uuid4().hex}/"}})
    with pytest.raises(RuntimeError, match="has no objects under prefix 'nothing-"):
        run_stage("clean", empty, minio.store)
    config_file = tmp_path / "clean.json"
    config = stage_config(minio.storage, "nobucket")
    config.spec.storage.raw_bucket = "no-such-raw"
    config_file.write_text(config.model_dump_json(by_alias=True))
    done = subprocess.run(
        [str(CLI), "stage", "run", "clean", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "latentmas stage: error: raw bucket 'no-such-raw' does not exist"
    assert not written(minio.store, "nobucket", "clean")


def test_cli_run_quarantines_hidden_and_rootless_objects(minio: MinioFixture, tmp_path: Path) -> None:
    prefix = f"hidden-{uuid.uuid4().hex[:6]}/"
    upload_subset(minio.store, prefix, ["python/heapq.txt"])
    minio.store.put_bytes("raw", prefix + "python/_draft.txt", b"draft " * 100)
    minio.store.put_bytes("raw", prefix + "loose.txt", b"no domain " * 50)
    config = tmp_path / "clean.yaml"
    config.write_text(
        yaml.safe_dump(
            stage_config(minio.storage, "hidden", {"cleaning": {"rawPrefix": prefix}}).model_dump(by_alias=True)
        )
    )
    done = subprocess.run(
        [str(CLI), "stage", "run", "clean", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["documents"] == 1
    reasons = {
        q["source"].removeprefix(prefix): q["reason"]
        for q in read_jsonl(minio.store, stage_key("hidden", "clean", "quarantine.jsonl"))
    }
    assert reasons == {"python/_draft.txt": "hidden_object", "loose.txt": "no_domain"}
