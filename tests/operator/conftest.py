"""Shared fixtures for the operator tests: the CRD installed on the real control plane, one real
operator process (`latentmas operator run`) for the whole session, and per-test namespaces holding the
MinIO credentials Secret the stacks reference."""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from latentmas.operator import kube
from latentmas.testing.controlplane import Cluster, ControlPlane
from latentmas.testing.fixtures import MinioFixture
from latentmas.testing.procs import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "latentmasstack.yaml"
SECRET = "s3-credentials"


@pytest.fixture(scope="session")
def api(control_plane: ControlPlane) -> client.ApiClient:
    return kube.api_client(str(control_plane.kubeconfig))


def install_crd(plane: ControlPlane, path: Path) -> None:
    plane.install_crd(path.read_text())


@pytest.fixture(scope="session")
def crd_installed(control_plane: ControlPlane) -> Path:
    install_crd(control_plane, CRD_FILE)
    return CRD_FILE


@dataclass
class OperatorProcess:
    """The real operator as a child process, so a test can kill -9 and restart it."""

    kubeconfig: Path
    log_dir: Path
    process: ServerProcess | None = None
    metrics_port: int = 0
    starts: int = 0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # e.g. PYTHONPATH at another release's code
    cwd: Path | None = None

    def start(self) -> OperatorProcess:
        self.metrics_port, health = free_port(), free_port()
        self.starts += 1
        argv = [
            sys.executable,
            "-c",
            "from latentmas.cli import main; main()",
            "operator",
            "run",
            "--kubeconfig",
            str(self.kubeconfig),
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(health),
            "--poll-seconds",
            "1",
            "--resync-seconds",
            "5",
            "--manifest-grace-seconds",
            "3",
            "--watch-server-timeout",
            "30",
            "--watch-client-timeout",
            "40",
            "--trigger-image",
            "latentmas-operator:test",
            *self.extra_args,
        ]
        self.process = ServerProcess(f"operator-{self.starts}", argv, self.log_dir, env=self.env, cwd=self.cwd)
        self.process.wait_until(lambda: _http_ok(f"http://127.0.0.1:{health}/healthz"), 60, "operator liveness")
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers run, as when a node dies."""
        assert self.process is not None
        os.killpg(self.process.proc.pid, signal.SIGKILL)
        self.process.proc.wait()
        self.process.stop()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def log(self) -> str:
        assert self.process is not None
        return self.process.log_path.read_text(errors="replace")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return int(response.status) == 200


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crd_installed: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator-logs")).start()
    try:
        yield proc
    finally:
        proc.stop()


def new_namespace(plane: ControlPlane, minio: MinioFixture | None = None) -> str:
    """A fresh namespace, with the MinIO credentials Secret when `minio` is given (and a raw document, so
    that a cycle has data to clean: on an empty raw bucket it ends as NoNewData)."""
    name = f"op-{uuid.uuid4().hex[:8]}"
    plane.kubectl("create", "namespace", name)
    if minio is not None:
        minio.store.ensure_bucket("raw")
        minio.store.put_bytes("raw", f"docs/{name}.txt", f"a document for the stacks of {name}".encode())
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": name},
            "stringData": {"accessKey": minio.server.access_key, "secretKey": minio.server.secret_key},
        }
        plane.kubectl("apply", "-f", "-", input_text=json.dumps(secret))
    return name


def stack_body(name: str, namespace: str, minio: MinioFixture, **spec: Any) -> dict[str, Any]:
    """A small stack on the MinIO fixture: two experts, one GPU inference replica, fast retries."""
    base: dict[str, Any] = {
        "storage": {"endpoint": minio.endpoint, "credentialsSecretRef": {"name": SECRET}},
        "experts": [{"name": "law", "domain": "law"}, {"name": "med", "domain": "med"}],
        "pipeline": {"retry": {"retries": 1, "backoffSeconds": 1, "deadlineSeconds": 600}},
        "inference": {"replicas": 1, "resources": {"cpu": "1", "memory": "1Gi", "gpu": 1}},
    }
    base.update(spec)
    return {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": name, "namespace": namespace},
        "spec": base,
    }


def apply_yaml(plane: ControlPlane, obj: dict[str, Any]) -> str:
    return plane.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(obj))


def get_stack(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    found = kube.get(api, "LatentMASStack", namespace, name)
    assert found is not None, f"stack {namespace}/{name} is gone"
    return found


def typed(api: client.ApiClient) -> tuple[client.CoreV1Api, client.AppsV1Api, client.BatchV1Api]:
    return client.CoreV1Api(api), client.AppsV1Api(api), client.BatchV1Api(api)
