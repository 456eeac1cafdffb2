"""SparkSession factory with s3a configured for the stack's object store (MinIO in tests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from latentmas.spec import StorageSpec
from latentmas.store import ACCESS_KEY_ENV, SECRET_KEY_ENV

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# pyspark 3.5 bundles Hadoop 3.3.4; hadoop-aws must match it exactly (it pulls aws-java-sdk-bundle 1.12.262).
HADOOP_AWS_PACKAGE = "org.apache.hadoop:hadoop-aws:3.3.4"
IVY_CACHE = Path(os.environ.get("LATENTMAS_IVY_CACHE", Path.home() / ".cache" / "latentmas" / "ivy"))


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


def spark_session(storage: StorageSpec, app_name: str = "latentmas", master: str | None = None) -> SparkSession:
    """A SparkSession (local mode unless `master` or SPARK_MASTER says otherwise) reading/writing s3a://."""
    from pyspark.sql import SparkSession

    access_key = os.environ.get(ACCESS_KEY_ENV, "")
    secret_key = os.environ.get(SECRET_KEY_ENV, "")
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master or os.environ.get("SPARK_MASTER", "local[2]"))
        .config("spark.jars.packages", HADOOP_AWS_PACKAGE)
        .config("spark.jars.ivy", str(IVY_CACHE))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.adaptive.coalescePartitions.enabled", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", os.environ.get("LATENTMAS_SPARK_DRIVER_MEMORY", "2g"))
        .config("spark.sql.session.timeZone", "UTC")
    )
    for key, value in s3a_options(storage, access_key, secret_key).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
