"""One tenant's unreachable storage: an endpoint that accepts TCP and never answers costs one short
timeout, then the stack's circuit breaker keeps the operator off it (the next reconcile makes no
connection) while `StorageReachable=False` names the endpoint. Ordering, not wall time, is asserted."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from latentmas.operator import kube
from latentmas.operator.breaker import CircuitBreaker, open_seconds
from latentmas.operator.plan import Settings
from latentmas.operator.reconciler import Reconciler
from latentmas.testing.controlplane import ControlPlane

from tests.operator.conftest import SECRET, get_stack, new_namespace

pytestmark = pytest.mark.operator


class Blackhole:
    """A loopback server that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.server.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


def test_breaker_opens_with_doubling_backoff_and_closes_on_success() -> None:
    now = [100.0]
    breaker = CircuitBreaker(clock=lambda: now[0])
    key = ("ns", "team")
    assert breaker.blocked(key) is None
    breaker.failed(key, "minio:9000 unreachable")
    assert "minio:9000 unreachable" in (breaker.blocked(key) or "")
    now[0] += open_seconds(1)
    assert breaker.blocked(key) is None
    breaker.failed(key, "again")
    now[0] += open_seconds(1)
    assert breaker.blocked(key) is not None, "the second failure keeps it open twice as long"
    breaker.succeeded(key)
    assert breaker.blocked(key) is None
    assert [open_seconds(n) for n in (1, 2, 3, 10)] == [5.0, 10.0, 20.0, 300.0]


def test_unreachable_storage_is_a_condition_and_is_not_retried_while_the_breaker_is_open(
    control_plane: ControlPlane, crd_installed: Path, api: client.ApiClient, blackhole: Blackhole
) -> None:
    namespace = new_namespace(control_plane)
    secret = {"accessKey": "a", "secretKey": "b"}
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
    }
    kube.request(api, "POST", kube.path("Secret", namespace), body)
    endpoint = f"127.0.0.1:{blackhole.port}"
    stack = {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": "stalled", "namespace": namespace},
        "spec": {
            "storage": {"endpoint": endpoint, "credentialsSecretRef": {"name": SECRET}},
            "experts": [{"name": "law", "domain": "law"}],
            "inference": {"enabled": False},
        },
    }
    kube.request(api, "POST", f"/apis/latentmas.io/v1alpha1/namespaces/{namespace}/latentmasstacks", stack)
    reconciler = Reconciler(api, Settings())
    reconciler.reconcile(namespace, "stalled")
    first = blackhole.accepted
    assert first >= 1, "the first reconcile tried the endpoint"
    conditions = {c["type"]: c for c in get_stack(api, namespace, "stalled")["status"]["conditions"]}
    reachable = conditions["StorageReachable"]
    assert reachable["status"] == "False" and reachable["reason"] == "Unreachable"
    assert endpoint in reachable["message"]
    # The next reconciles (breaker open) do not connect at all; the status says when it tries again.
    reconciler.reconcile(namespace, "stalled")
    reconciler.reconcile(namespace, "stalled")
    assert blackhole.accepted == first
    conditions = {c["type"]: c for c in get_stack(api, namespace, "stalled")["status"]["conditions"]}
    assert "next try in" in conditions["StorageReachable"]["message"]
