"""Two operator replicas with leader election (a coordination.k8s.io Lease): only the leader reconciles;
when it dies (SIGKILL, no release of the Lease) the standby takes over once the Lease expires."""

from __future__ import annotations

import json
import re
import urllib.error
import uuid
from pathlib import Path

import pytest
from latentmas.testing.controlplane import Cluster
from latentmas.testing.fixtures import MinioFixture
from latentmas.testing.procs import eventually

from tests.operator.conftest import OperatorProcess, apply_yaml, new_namespace, stack_body

pytestmark = pytest.mark.operator


def _reconciles(proc: OperatorProcess) -> float:
    """Reconciles done; a standby has not started its work queue (nor its metrics endpoint): 0."""
    try:
        text = proc.metrics()
    except urllib.error.URLError:
        return 0.0
    found = re.findall(r'^latentmas_operator_reconciles_total\{result="ok"\} ([0-9.e+]+)$', text, re.M)
    return float(found[0]) if found else 0.0


def test_only_the_leader_reconciles_and_the_standby_takes_over(
    cluster: Cluster, minio: MinioFixture, crd_installed: Path, tmp_path: Path
) -> None:
    namespace = new_namespace(cluster.control_plane, minio)
    lease = f"lms-{uuid.uuid4().hex[:6]}"
    extra = ["--leader-elect", "--leader-election-namespace", namespace, "--leader-election-lease", lease]
    extra += ["--namespace", namespace]
    first = OperatorProcess(cluster.kubeconfig, tmp_path / "a", extra_args=extra)
    second = OperatorProcess(cluster.kubeconfig, tmp_path / "b", extra_args=extra)
    try:
        first.start()
        holder = eventually(lambda: _holder(cluster, namespace, lease), 180, "a Lease holder")
        second.start()
        apply_yaml(cluster.control_plane, stack_body("led", namespace, minio, inference={"enabled": False}))
        eventually(lambda: _reconciles(first) > 0, 180, "the leader reconciling")
        assert _reconciles(second) == 0, "the standby never reconciles"
        assert _holder(cluster, namespace, lease) == holder
        first.kill()
        eventually(lambda: _holder(cluster, namespace, lease) not in (None, holder), 180, "the standby leading")
        eventually(lambda: _reconciles(second) > 0, 180, "the new leader reconciling")
    finally:
        first.stop()
        second.stop()


def _holder(cluster: Cluster, namespace: str, lease: str) -> str | None:
    out = cluster.kubectl("get", "lease", lease, "-n", namespace, "-o", "json", check=False)
    return (json.loads(out).get("spec") or {}).get("holderIdentity") if out else None
