"""The clean stage on a Spark cluster with separate executor JVMs (`local-cluster`: two workers, one
core each, a real shuffle between them), run the way a Job runs it (`latentmas stage run`), reading
and writing MinIO over s3a: the same rows as the python engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyspark
import pytest
from latentmas.jobs.clean_spark import partition_confs
from latentmas.stage import MANIFEST, StageConfig
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import stage_config, stage_key
from tests.data.test_clean import outputs

pytestmark = pytest.mark.data
CLI = Path(sys.executable).parent / "latentmas"


def test_two_executor_cluster_matches_python_engine(
    minio: MinioFixture, cleaned: StageConfig, subset_prefix: str, tmp_path: Path
) -> None:
    config = stage_config(minio.storage, "spark-cluster", {"cleaning": {"engine": "spark", "rawPrefix": subset_prefix}})
    config_file = tmp_path / "clean.json"
    config_file.write_text(config.model_dump_json(by_alias=True))
    env = {
        **os.environ,
        "SPARK_MASTER": "local-cluster[2,1,1024]",
        "SPARK_HOME": str(Path(pyspark.__file__).parent),  # the workers launch executors with its spark-class
        "PYSPARK_PYTHON": sys.executable,
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
    python_manifest = json.loads(minio.store.get_bytes("artifacts", stage_key("chain", "clean", MANIFEST)))
    assert manifest["counts"] == python_manifest["counts"]
    cluster_out, python_out = outputs(minio, "spark-cluster"), outputs(minio, "chain")
    for name in ("corpus", "metrics", "chunks", "quarantine"):
        assert cluster_out[name] == python_out[name], f"{name} differs between the cluster and the python engine"


def test_partitions_are_sized_from_the_input() -> None:
    small = partition_confs(8_940_000, 2)  # the sample corpus x 4 on two task slots: ~8 read tasks
    assert int(small["spark.sql.files.maxPartitionBytes"]) == 8_940_000 // 8
    assert int(small["spark.sql.files.openCostInBytes"]) < 64 << 10  # small objects are packed, not one per task
    assert small["spark.sql.shuffle.partitions"] == "4"
    large = partition_confs(100 << 30, 32)  # 100 GiB on 32 slots: splits capped at 128 MB, shuffles of ~64 MB
    assert large["spark.sql.files.maxPartitionBytes"] == str(128 << 20)
    assert large["spark.sql.shuffle.partitions"] == str(1600)
    assert partition_confs(1000, 1)["spark.sql.files.maxPartitionBytes"] == str(256 << 10)
