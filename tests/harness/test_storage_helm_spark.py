"""MinIO, helm and Spark fixtures are real: S3 semantics and notifications, chart installs, s3a I/O."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from latentmas.store import ObjectNotFound, open_store
from latentmas.testing.controlplane import Cluster
from latentmas.testing.fixtures import Helm, MinioFixture

pytestmark = pytest.mark.harness


def test_minio_put_get_list_and_missing(minio: MinioFixture) -> None:
    store = open_store(minio.storage)
    prefix = f"harness/{uuid.uuid4().hex}/"
    etags = {store.put_bytes("raw", f"{prefix}{i}.txt", f"doc {i}".encode()) for i in range(3)}
    assert len(etags) == 3
    assert store.get_bytes("raw", f"{prefix}1.txt") == b"doc 1"
    assert [o.key for o in store.list("raw", prefix)] == [f"{prefix}{i}.txt" for i in range(3)]
    with pytest.raises(ObjectNotFound):
        store.get_bytes("raw", f"{prefix}missing.txt")


def test_minio_bucket_notification_arrives(minio: MinioFixture) -> None:
    key = f"notify/{uuid.uuid4().hex}.json"
    received: list[str] = []
    listening = threading.Event()

    def listen() -> None:
        with minio.store.client.listen_bucket_notification(
            "artifacts", prefix="notify/", events=("s3:ObjectCreated:*",)
        ) as events:
            listening.set()
            for event in events:
                received.extend(r["s3"]["object"]["key"] for r in event.get("Records", []))
                if received:
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert listening.wait(60)
    # The listener subscribes asynchronously: keep writing until the event shows up (a minute on a loaded machine).
    deadline = time.monotonic() + 60
    while not received and time.monotonic() < deadline:
        minio.store.put_bytes("artifacts", key, json.dumps({"v": 1}).encode())
        thread.join(0.5)
    assert key in received


def test_helm_lint_and_install_into_cluster(helm: Helm, cluster: Cluster, tmp_path: Path) -> None:
    helm.run("create", str(tmp_path / "demo"))
    assert "0 chart(s) failed" in helm.run("lint", str(tmp_path / "demo")).stdout
    namespace = f"helm-{uuid.uuid4().hex[:6]}"
    helm.run(
        "install",
        "demo",
        str(tmp_path / "demo"),
        "-n",
        namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        "300s",
    )
    status = json.loads(helm.run("status", "demo", "-n", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    deployments = json.loads(cluster.kubectl("get", "deployments", "-n", namespace, "-o", "json"))["items"]
    assert deployments[0]["status"]["readyReplicas"] == 1


def test_spark_writes_and_reads_parquet_on_s3a(spark, minio: MinioFixture) -> None:
    path = f"s3a://artifacts/harness/{uuid.uuid4().hex}/table"
    rows = [(i, f"row-{i}") for i in range(100)]
    spark.createDataFrame(rows, ["id", "name"]).repartition(3).write.parquet(path)
    back = spark.read.parquet(path)
    assert back.count() == 100
    assert sorted(r["id"] for r in back.collect()) == list(range(100))
    written = [o.key for o in minio.store.list("artifacts", path.removeprefix("s3a://artifacts/"))]
    assert any(k.endswith(".parquet") for k in written)
