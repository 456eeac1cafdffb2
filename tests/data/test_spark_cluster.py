"""The clean stage on a Spark cluster with separate executor JVMs (`local-cluster`: two workers, one
core each, a real shuffle between them), run the way a Job runs it (`latentmas stage run`), reading
and writing MinIO over s3a: the same rows as the python engine, on the corpus subset plus objects
above the line-read size (lowered for the test) that are read as lines in several splits (JSONL in UTF-8 and cp1251) or
streamed back together in one task (plain text cleaned in parts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyspark
import pytest
from latentmas.jobs.clean_spark import partition_confs
from latentmas.stage import MANIFEST, run_stage
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import stage_config, stage_key, upload_subset
from tests.data.test_clean import outputs
from tests.data.test_spark_reads import SMALL, large_objects

pytestmark = pytest.mark.data
CLI = Path(sys.executable).parent / "latentmas"


def test_two_executor_cluster_matches_python_engine(minio: MinioFixture, tmp_path: Path) -> None:
    prefix = "cluster/"
    upload_subset(minio.store, prefix)
    for rel, data in large_objects(SMALL).items():
        minio.store.put_bytes("raw", prefix + rel, data)
    python_config = stage_config(minio.storage, "cluster-python", {"cleaning": {"rawPrefix": prefix}})
    run_stage("clean", python_config, minio.store)
    config = stage_config(minio.storage, "spark-cluster", {"cleaning": {"engine": "spark", "rawPrefix": prefix}})
    config_file = tmp_path / "clean.json"
    config_file.write_text(config.model_dump_json(by_alias=True))
    env = {
        **os.environ,
        "SPARK_MASTER": "local-cluster[2,1,1024]",
        "SPARK_HOME": str(Path(pyspark.__file__).parent),  # the workers launch executors with its spark-class
        "PYSPARK_PYTHON": sys.executable,
        "LATENTMAS_SPARK_LINE_READ_BYTES": str(SMALL - 100_000),  # the objects above it cost less than 1 MB ones
    }
    done = subprocess.run(
        [str(CLI), "stage", "run", "clean", "--config", str(config_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads(minio.store.get_bytes("artifacts", stage_key("spark-cluster", "clean", MANIFEST)))
    assert manifest["metrics"]["spark"]["master"] == "local-cluster[2,1,1024]"
    assert manifest["metrics"]["spark"]["executors"] == 2
    reads = manifest["metrics"]["spark"]["reads"]
    assert reads["streamedObjects"] == 1 and reads["lineObjects"] == 2
    assert all(count >= 2 for count in reads["lineSplits"].values()), reads  # many tasks, not one row each
    python_manifest = json.loads(minio.store.get_bytes("artifacts", stage_key("cluster-python", "clean", MANIFEST)))
    assert manifest["counts"] == python_manifest["counts"]
    cluster_out, python_out = outputs(minio, "spark-cluster"), outputs(minio, "cluster-python")
    for name in ("corpus", "metrics", "chunks", "quarantine"):
        assert cluster_out[name] == python_out[name], f"{name} differs between the cluster and the python engine"
    large = {(row["source"].split("#")[0].removeprefix(prefix), row["encoding"]) for row in cluster_out["corpus"]}
    assert {
        ("math/lines-utf8.jsonl", "utf-8"),
        ("python/lines-cp1251.jsonl", "cp1251"),
        ("linux/long.txt", "utf-8"),
    } <= large


def test_partitions_are_sized_from_the_input() -> None:
    small = partition_confs(8_940_000, 2)  # the sample corpus x 4 on two task slots: ~8 read tasks
    assert int(small["spark.sql.files.maxPartitionBytes"]) == 8_940_000 // 8
    assert int(small["spark.sql.files.openCostInBytes"]) < 64 << 10  # small objects are packed, not one per task
    assert small["spark.sql.shuffle.partitions"] == "4"
    large = partition_confs(100 << 30, 32)  # 100 GiB on 32 slots: splits capped at 128 MB, shuffles of ~64 MB
    assert large["spark.sql.files.maxPartitionBytes"] == str(128 << 20)
    assert large["spark.sql.shuffle.partitions"] == str(1600)
    assert partition_confs(1000, 1)["spark.sql.files.maxPartitionBytes"] == str(256 << 10)
