"""SparkSession factory with s3a configured for the stack's object store (MinIO in tests), and the
Kubernetes side of a driver that starts its own executor pods."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentmas.sparkjars import bundled_hadoop_version, spark_home
from latentmas.spec import LatentMASStackSpec, StorageSpec
from latentmas.store import ACCESS_KEY_ENV, SECRET_KEY_ENV

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

IVY_CACHE = Path(os.environ.get("LATENTMAS_IVY_CACHE", Path.home() / ".cache" / "latentmas" / "ivy"))
EXECUTOR_CONTAINER = "spark-executor"


def s3a_packages(jars: Path) -> str | None:
    """`spark.jars.packages` for s3a: hadoop-aws of exactly the bundled Hadoop (it pulls the matching AWS
    SDK bundle), or None when the image already carries the jars in Spark's jars folder (they are on the
    classpath from JVM start; resolving packages inside a SparkApplication driver would come too late)."""
    if any(jars.glob("hadoop-aws-*.jar")):
        return None
    return f"org.apache.hadoop:hadoop-aws:{bundled_hadoop_version(jars)}"


def executor_pod_template(spec: LatentMASStackSpec | None) -> dict[str, Any]:
    """The pod template a driver gives the executor pods it creates: the same Pod Security "restricted"
    settings as the operator's own pods and, when `spec` is given, the clean Job's placement (`stages.clean`
    nodeSelector/tolerations; the stack's own apply to GPU pods only). Spark adds image, command, env,
    resources and volumes."""
    from latentmas.operator.children import pod_placement, pod_security_context, security_context

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": pod_security_context(),
            "containers": [{"name": EXECUTOR_CONTAINER, "securityContext": security_context()}],
            **(pod_placement(spec, gpu=False, override=spec.stages.get("clean")) if spec else {}),
        },
    }


def launches_own_jvm(env: Mapping[str, str]) -> bool:
    """True when this Python process starts the driver JVM (a Job pod in client mode); False inside a
    driver started by spark-submit (a SparkApplication), whose executor pods get their security settings
    and placement from the SparkApplication (spec.executor) through the Spark operator."""
    return "PYSPARK_GATEWAY_PORT" not in env


def kubernetes_confs(spec: LatentMASStackSpec | None, folder: Path) -> dict[str, str]:
    """Confs of a client-mode driver on a `k8s://` master: executors from a restricted pod template
    (written under `folder`, the pod's writable /tmp)."""
    fd, path = tempfile.mkstemp(prefix="executor-pod-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as out:
        json.dump(executor_pod_template(spec), out)
    return {
        "spark.kubernetes.executor.podTemplateFile": path,
        "spark.kubernetes.executor.podTemplateContainerName": EXECUTOR_CONTAINER,
    }


def s3a_options(storage: StorageSpec, access_key: str, secret_key: str) -> dict[str, str]:
    scheme = "https" if storage.secure else "http"
    return {
        "spark.hadoop.fs.s3a.endpoint": f"{scheme}://{storage.endpoint}",
        "spark.hadoop.fs.s3a.endpoint.region": storage.region,
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.connection.ssl.enabled": str(storage.secure).lower(),
        "spark.hadoop.fs.s3a.access.key": access_key,
        "spark.hadoop.fs.s3a.secret.key": secret_key,
        "spark.hadoop.fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
        "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.s3a.attempts.maximum": "3",
        "spark.hadoop.fs.s3a.retry.limit": "3",
        "spark.hadoop.fs.s3a.connection.establish.timeout": "5000",
    }


def deployment_confs(
    master: str, env: Mapping[str, str], jars: Path, spec: LatentMASStackSpec | None, folder: Path
) -> dict[str, str]:
    """Where the s3a jars come from (packages unless baked into `jars`) and, for a driver that starts
    its own executor pods on Kubernetes, their restricted pod template."""
    confs: dict[str, str] = {}
    if (packages := s3a_packages(jars)) is not None:
        confs |= {"spark.jars.packages": packages, "spark.jars.ivy": str(IVY_CACHE)}
    if master.startswith("k8s://") and launches_own_jvm(env):
        confs |= kubernetes_confs(spec, folder)
    return confs


def spark_session(
    storage: StorageSpec,
    app_name: str = "latentmas",
    master: str | None = None,
    spec: LatentMASStackSpec | None = None,
) -> SparkSession:
    """A SparkSession (local mode unless `master` or SPARK_MASTER says otherwise) reading/writing s3a://.
    On a Kubernetes master `spec` gives the executor pods their placement."""
    from pyspark.sql import SparkSession

    access_key = os.environ.get(ACCESS_KEY_ENV, "")
    secret_key = os.environ.get(SECRET_KEY_ENV, "")
    master = master or os.environ.get("SPARK_MASTER", "local[2]")
    confs = deployment_confs(master, os.environ, spark_home() / "jars", spec, Path(tempfile.gettempdir()))
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master)
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.adaptive.coalescePartitions.enabled", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", os.environ.get("LATENTMAS_SPARK_DRIVER_MEMORY", "2g"))
        .config("spark.sql.session.timeZone", "UTC")
    )
    for key, value in (confs | s3a_options(storage, access_key, secret_key)).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
