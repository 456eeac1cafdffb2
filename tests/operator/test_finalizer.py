"""Finalizer patches carry a resourceVersion precondition: a finalizer another controller added after
the operator read the stack is kept (the stale patch is refused and redone from a fresh read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes import client
from latentmas.operator import kube, names
from latentmas.operator.plan import Plan, Settings
from latentmas.operator.reconciler import Conflict, Reconciler
from latentmas.testing.controlplane import ControlPlane

from tests.operator.conftest import SECRET, get_stack, new_namespace

pytestmark = pytest.mark.operator


def test_a_concurrently_added_finalizer_is_never_dropped(
    control_plane: ControlPlane, crd_installed: Path, api: client.ApiClient
) -> None:
    namespace = new_namespace(control_plane)
    body = {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": "shared", "namespace": namespace},
        "spec": {
            "storage": {
                "endpoint": "127.0.0.1:1",
                "credentialsSecretRef": {"name": SECRET},
                "artifactPolicy": "Delete",
            },
            "experts": [{"name": "law", "domain": "law"}],
        },
    }
    kube.request(api, "POST", f"/apis/latentmas.io/v1alpha1/namespaces/{namespace}/latentmasstacks", body)
    reconciler = Reconciler(api, Settings())
    stale = reconciler.read(namespace, "shared")
    assert stale is not None
    other = [{"op": "add", "path": "/metadata/finalizers", "value": ["example.com/backup"]}]
    control_plane.kubectl("patch", "-n", namespace, "lms/shared", "--type=json", "-p", json.dumps(other))
    with pytest.raises(Conflict):
        reconciler.execute(stale, Plan(status=stale.view.status, add_finalizer=True))
    fresh = reconciler.read(namespace, "shared")
    assert fresh is not None
    reconciler.execute(fresh, Plan(status=fresh.view.status, add_finalizer=True))
    finalizers = get_stack(api, namespace, "shared")["metadata"]["finalizers"]
    assert sorted(finalizers) == sorted(["example.com/backup", names.FINALIZER])


def test_a_status_decided_on_a_stale_read_is_not_written(
    control_plane: ControlPlane, crd_installed: Path, api: client.ApiClient
) -> None:
    """Status writes carry the same precondition: a status planned from a read the stack has moved past
    (here an edit by someone else) is refused as a Conflict, then written from a fresh read."""
    namespace = new_namespace(control_plane)
    body = {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": "edited", "namespace": namespace},
        "spec": {
            "storage": {"endpoint": "127.0.0.1:1", "credentialsSecretRef": {"name": SECRET}},
            "experts": [{"name": "law", "domain": "law"}],
        },
    }
    kube.request(api, "POST", f"/apis/latentmas.io/v1alpha1/namespaces/{namespace}/latentmasstacks", body)
    reconciler = Reconciler(api, Settings())
    stale = reconciler.read(namespace, "edited")
    assert stale is not None
    control_plane.kubectl("annotate", "-n", namespace, "lms/edited", "example.com/touched=yes")
    decided = stale.view.status.model_copy(update={"phase": "Degraded"})
    with pytest.raises(Conflict, match="status not written"):
        reconciler.write_status(stale, decided)
    assert get_stack(api, namespace, "edited").get("status", {}).get("phase") != "Degraded"
    fresh = reconciler.read(namespace, "edited")
    assert fresh is not None
    reconciler.write_status(fresh, decided)
    reconciler.write_status(fresh, decided.model_copy(update={"phase": "Pending"}))  # its own write moved the version
    assert get_stack(api, namespace, "edited")["status"]["phase"] == "Pending"
