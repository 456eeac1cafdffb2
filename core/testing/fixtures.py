"""Session-scoped pytest fixtures for the real test bed. Loaded by tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from latentmas.spec import StorageSpec
from latentmas.store import ACCESS_KEY_ENV, SECRET_KEY_ENV, S3Store
from latentmas.testing.binaries import binary
from latentmas.testing.controlplane import Cluster, ControlPlane
from latentmas.testing.objectstore import MinioServer

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LOG_DIRS: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = bool(torch.cuda.is_available())
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        for folder in LOG_DIRS:
            terminalreporter.write_line(f"server logs kept in {folder}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    LOG_DIRS.append(plane.log_dir)
    try:
        yield plane.start()
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def cluster(control_plane: ControlPlane) -> Iterator[Cluster]:
    whole = Cluster(control_plane)
    try:
        yield whole.start()
    finally:
        whole.stop()


@dataclass
class MinioFixture:
    server: MinioServer
    store: S3Store
    buckets: tuple[str, ...]

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def storage(self) -> StorageSpec:
        return StorageSpec(endpoint=self.server.endpoint)


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioFixture]:
    """A real MinIO server with the stack's buckets; its credentials are exported the way a Job gets them."""
    server = MinioServer(tmp_path_factory.mktemp("minio"))
    LOG_DIRS.append(server.workdir / "logs")
    server.start()
    saved = {k: os.environ.get(k) for k in (ACCESS_KEY_ENV, SECRET_KEY_ENV)}
    os.environ[ACCESS_KEY_ENV], os.environ[SECRET_KEY_ENV] = server.access_key, server.secret_key
    store = S3Store(server.endpoint, server.access_key, server.secret_key, secure=False, region="us-east-1")
    buckets = ("raw", "artifacts")
    for bucket in buckets:
        store.ensure_bucket(bucket)
    try:
        yield MinioFixture(server, store, buckets)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@dataclass
class Helm:
    """The real helm binary, pointed at the fixture kubeconfig, with its own cache/config folders."""

    kubeconfig: Path
    home: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        done = subprocess.run([binary("helm"), *args], capture_output=True, text=True, env=env, timeout=300)
        if check and done.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed: {done.stderr.strip()}")
        return done


@pytest.fixture(scope="session")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(control_plane.kubeconfig, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def spark(minio: MinioFixture) -> Iterator[SparkSession]:
    """A local SparkSession reading and writing s3a:// on the minio fixture."""
    from latentmas.spark import spark_session

    session = spark_session(minio.storage, app_name="latentmas-tests")
    try:
        yield session
    finally:
        session.stop()
