"""One tenant's unreachable storage: an endpoint that accepts TCP and never answers costs one short
timeout, then the stack's circuit breaker keeps the operator off it (the next reconcile makes no
connection) while `StorageReachable=False` names the endpoint. Ordering, not wall time, is asserted."""

from __future__ import annotations

import asyncio
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
from latentmas.operator.workqueue import WorkQueue
from latentmas.testing.controlplane import ControlPlane
from latentmas.testing.fixtures import MinioFixture
from latentmas.testing.procs import eventually

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


@pytest.fixture
def blackholes() -> Iterator[list[Blackhole]]:
    holes = [Blackhole() for _ in range(4)]
    yield holes
    for hole in holes:
        hole.close()


class InProcessOperator:
    """The operator's reconciler behind its real work queue (4 workers) on an asyncio loop of its own,
    recording which stacks' reconciles completed, in order."""

    def __init__(self, api: client.ApiClient, settings: Settings) -> None:
        self.reconciler = Reconciler(api, settings)
        self.completed: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def work(key: tuple[str, str]) -> float | None:
            delay = await asyncio.to_thread(self.reconciler.reconcile, *key)
            self.completed.append(key)
            return delay

        self.queue = WorkQueue(work, workers=4)
        self.loop.call_soon_threadsafe(self.queue.start)
        self.reconciler.wake_on_storage(self.add)

    def add(self, key: tuple[str, str]) -> None:
        self.loop.call_soon_threadsafe(self.queue.add, key)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.queue.stop(), self.loop).result(timeout=30)
        self.reconciler.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


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
    # The breaker's clock stands still: once open it stays open, so the reconciles below cannot outlast its 5 s
    # backoff on a loaded machine and contact the endpoint again (the backoff itself is the test above's).
    reconciler.breaker.clock = lambda: 0.0

    def reported() -> dict | None:
        reconciler.reconcile(namespace, "stalled")  # gives the worker back while the read is running
        found = {c["type"]: c for c in (get_stack(api, namespace, "stalled").get("status") or {}).get("conditions", [])}
        return found.get("StorageReachable")

    reachable = eventually(reported, 120, "the StorageReachable condition", interval=0.5)
    first = blackhole.accepted
    assert first >= 1, "the read tried the endpoint"
    assert reachable["status"] == "False" and reachable["reason"] == "Unreachable"
    assert endpoint in reachable["message"]
    # The next reconciles (breaker open) do not connect at all; the status says when it tries again.
    reconciler.reconcile(namespace, "stalled")
    reconciler.reconcile(namespace, "stalled")
    assert blackhole.accepted == first
    conditions = {c["type"]: c for c in get_stack(api, namespace, "stalled")["status"]["conditions"]}
    assert "next try in" in conditions["StorageReachable"]["message"]


def _stack(namespace: str, name: str, endpoint: str) -> dict:
    return {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": name, "namespace": namespace, "annotations": {"latentmas.io/evolve": "first"}},
        "spec": {
            "storage": {"endpoint": endpoint, "credentialsSecretRef": {"name": SECRET}},
            "experts": [{"name": "law", "domain": "law"}],
            "inference": {"enabled": False},
        },
    }


def test_four_unreachable_endpoints_do_not_delay_a_healthy_stacks_cycle(
    control_plane: ControlPlane,
    crd_installed: Path,
    api: client.ApiClient,
    minio: MinioFixture,
    blackholes: list[Blackhole],
) -> None:
    """As many stalled tenants as reconcile workers: their storage reads hang (a long read timeout here,
    so they cannot resolve during the test) and still the healthy stack's first stage Job is created.
    Ordering, not wall time: the healthy reconcile completes while every stalled read is in flight."""
    namespace = new_namespace(control_plane, minio)
    operator = InProcessOperator(api, Settings(store_read_timeout=600.0, poll_seconds=1.0))
    try:
        stuck = [f"stuck-{i}" for i in range(4)]
        for name, hole in zip(stuck, blackholes, strict=True):
            body = _stack(namespace, name, f"127.0.0.1:{hole.port}")
            kube.request(api, "POST", f"/apis/latentmas.io/v1alpha1/namespaces/{namespace}/latentmasstacks", body)
            operator.add((namespace, name))
        eventually(lambda: all(h.accepted for h in blackholes), 120, "every stalled endpoint contacted")
        body = _stack(namespace, "healthy", minio.endpoint)
        kube.request(api, "POST", f"/apis/latentmas.io/v1alpha1/namespaces/{namespace}/latentmasstacks", body)
        operator.add((namespace, "healthy"))
        jobs = client.BatchV1Api(api)

        def first_job() -> bool:
            listed = jobs.list_namespaced_job(namespace, label_selector="latentmas.io/stack=healthy").items
            return bool(listed) and (namespace, "healthy") in operator.completed

        eventually(first_job, 120, "the healthy stack's first stage Job")
        for name, hole in zip(stuck, blackholes, strict=True):
            assert operator.reconciler.breaker.blocked((namespace, name)) is None, f"{name} already resolved"
            assert operator.reconciler.storage.in_flight((namespace, name)), f"{name}'s read is still in flight"
            assert hole.accepted >= 1
        assert get_stack(api, namespace, "healthy")["status"]["cycle"]["stages"]["clean"]["state"] == "Running"
    finally:
        operator.stop()
