"""Deletion never deadlocks: a namespace deleted with its credentials Secret and stack (artifactPolicy
Delete) goes away with a `PurgeAbandoned` Warning, and a purge that keeps failing is retried with a
`PurgeFailed` Warning and given up after its bound."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kubernetes import client
from latentmas.operator import kube, names
from latentmas.operator.observed import Observed
from latentmas.operator.plan import Settings, plan
from latentmas.operator.reconciler import Reconciler, parse_stack
from latentmas.testing.controlplane import Cluster, ControlPlane
from latentmas.testing.fixtures import MinioFixture
from latentmas.testing.procs import eventually

from tests.operator.conftest import SECRET, OperatorProcess, get_stack, new_namespace

pytestmark = pytest.mark.operator


def _stack(namespace: str, name: str, endpoint: str) -> dict:
    storage = {"endpoint": endpoint, "credentialsSecretRef": {"name": SECRET}, "artifactPolicy": "Delete"}
    return {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"storage": storage, "experts": [{"name": "law", "domain": "law"}], "inference": {"enabled": False}},
    }


def _create(api: client.ApiClient, body: dict) -> None:
    namespace = body["metadata"]["namespace"]
    kube.request(api, "POST", f"/apis/latentmas.io/v1alpha1/namespaces/{namespace}/latentmasstacks", body)


def _has_finalizer(api: client.ApiClient, namespace: str, name: str) -> bool:
    return names.FINALIZER in (get_stack(api, namespace, name)["metadata"].get("finalizers") or [])


def _events(api: client.ApiClient, namespace: str, reason: str) -> list:
    return [e.message for e in client.CoreV1Api(api).list_namespaced_event(namespace).items if e.reason == reason]


def test_namespace_deleted_with_its_secret_does_not_deadlock_the_finalizer(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    """The stack's credentials are gone (its Secret went first, as in a namespace deletion; here it is
    never readable, so no cached copy can purge): the namespace still goes away."""
    namespace = new_namespace(cluster.control_plane, minio)
    body = _stack(namespace, "doomed", minio.endpoint)
    body["spec"]["storage"]["credentialsSecretRef"]["name"] = "deleted-first"
    _create(api, body)
    eventually(lambda: _has_finalizer(api, namespace, "doomed"), 120, "the purge finalizer")
    key = f"{namespace}/doomed/registry.json"
    minio.store.put_bytes("artifacts", key, b"{}")
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    core = client.CoreV1Api(api)

    def namespace_gone() -> bool:
        return not any(n.metadata.name == namespace for n in core.list_namespace().items)

    eventually(namespace_gone, 300, "the namespace deleted (finalizer not deadlocked)", interval=1.0)
    assert minio.store.exists("artifacts", key), "without credentials nothing is purged (a Warning says so)"


def test_a_failing_purge_warns_retries_and_gives_up_after_its_bound(
    control_plane: ControlPlane, crd_installed: Path, api: client.ApiClient, minio: MinioFixture
) -> None:
    namespace = new_namespace(control_plane, minio)
    _create(api, _stack(namespace, "stuck", "127.0.0.1:1"))  # nothing listens: every purge fails
    reconciler = Reconciler(api, Settings(purge_timeout_seconds=4.0, store_wait_seconds=5.0))
    reconciler.reconcile(namespace, "stuck")
    assert _has_finalizer(api, namespace, "stuck")
    control_plane.kubectl("delete", "lms/stuck", "-n", namespace, "--wait=false")
    reconciler.reconcile(namespace, "stuck")
    assert _has_finalizer(api, namespace, "stuck"), "a failed purge keeps the finalizer"
    assert any("not deleted yet" in m for m in _events(api, namespace, "PurgeFailed"))

    def gone() -> bool:
        reconciler.reconcile(namespace, "stuck")
        return kube.get(api, "LatentMASStack", namespace, "stuck") is None

    eventually(gone, 120, "the stack gone once the purge bound passed", interval=1.0)
    abandoned = _events(api, namespace, "PurgeAbandoned")
    assert abandoned and "not deleted within 4 s" in abandoned[0]


def test_purge_is_given_up_only_after_the_bound() -> None:
    deleted = datetime(2026, 1, 1, tzinfo=UTC)
    raw = _stack("ns", "s", "minio:9000")
    raw["metadata"].update(uid="u1", finalizers=[names.FINALIZER], deletionTimestamp="2026-01-01T00:00:00Z")
    view = parse_stack(json.loads(json.dumps(raw)))
    settings = Settings(purge_timeout_seconds=60.0)
    early = plan(view, Observed(now=deleted + timedelta(seconds=59)), settings)
    assert early.purge_artifacts and early.remove_finalizer and not early.events
    late = plan(view, Observed(now=deleted + timedelta(seconds=61)), settings)
    assert not late.purge_artifacts and late.remove_finalizer
    assert [e.reason for e in late.events] == ["PurgeAbandoned"] and late.events[0].type == "Warning"
