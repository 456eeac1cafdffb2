"""The control plane and cluster fixtures are the real thing: API server semantics, controllers, kwok."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
from kubernetes import client, config, watch
from latentmas.testing.binaries import binary
from latentmas.testing.controlplane import MANUAL_COMPLETION_ANNOTATION, Cluster, ControlPlane, complete_pod
from latentmas.testing.procs import eventually

pytestmark = pytest.mark.harness


def api(plane: ControlPlane) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(plane.kubeconfig))


def fresh_namespace(plane: ControlPlane) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    plane.kubectl("create", "namespace", name)
    return name


def test_binaries_report_real_versions() -> None:
    out = subprocess.run([binary("kube-apiserver"), "--version"], capture_output=True, text=True).stdout
    assert out.strip() == "Kubernetes v1.34.4"
    helm_out = subprocess.run([binary("helm"), "version", "--short"], capture_output=True, text=True).stdout
    assert helm_out.startswith("v3.21.4")


def test_crd_and_custom_object_watch(control_plane: ControlPlane) -> None:
    group = "harness.latentmas.io"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                    "required": ["size"],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    control_plane.install_crd(json.dumps(crd))
    namespace = fresh_namespace(control_plane)
    custom = client.CustomObjectsApi(api(control_plane))
    stream = watch.Watch()
    events = stream.stream(custom.list_namespaced_custom_object, group, "v1", namespace, "widgets", timeout_seconds=30)
    custom.create_namespaced_custom_object(
        group,
        "v1",
        namespace,
        "widgets",
        {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}},
    )
    first = next(events)
    stream.stop()
    assert first["type"] == "ADDED"
    assert first["object"]["metadata"]["name"] == "w1"
    # Structural-schema validation is enforced by the real API server.
    with pytest.raises(client.ApiException) as rejected:
        custom.create_namespaced_custom_object(
            group,
            "v1",
            namespace,
            "widgets",
            {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w2"}, "spec": {"size": 0}},
        )
    assert rejected.value.status == 422
    assert "spec.size" in rejected.value.body


def test_kubectl_sees_ready_kwok_node(cluster: Cluster) -> None:
    table = cluster.kubectl("get", "nodes", "--no-headers")
    assert any(line.split()[:2] == ["kwok-node-0", "Ready"] for line in table.splitlines()), table


def test_job_pod_completes_through_kwok(cluster: Cluster) -> None:
    namespace = fresh_namespace(cluster.control_plane)
    batch = client.BatchV1Api(api(cluster.control_plane))
    batch.create_namespaced_job(
        namespace,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "hello"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "main", "image": "busybox", "command": ["true"]}],
                    }
                },
            },
        },
    )
    eventually(
        lambda: (batch.read_namespaced_job_status("hello", namespace).status.succeeded or 0) >= 1,
        180,
        "Job success",
    )
    pods = client.CoreV1Api(api(cluster.control_plane)).list_namespaced_pod(namespace).items
    assert [p.status.phase for p in pods] == ["Succeeded"]
    assert pods[0].spec.node_name == "kwok-node-0"


def test_deployment_reaches_ready_replicas(cluster: Cluster) -> None:
    namespace = fresh_namespace(cluster.control_plane)
    apps = client.AppsV1Api(api(cluster.control_plane))
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": "nginx"}]},
                },
            },
        },
    )
    eventually(
        lambda: (apps.read_namespaced_deployment_status("web", namespace).status.ready_replicas or 0) == 2,
        180,
        "2 ready replicas",
    )


def test_cronjob_fires_on_its_schedule(cluster: Cluster) -> None:
    namespace = fresh_namespace(cluster.control_plane)
    batch = client.BatchV1Api(api(cluster.control_plane))
    batch.create_namespaced_cron_job(
        namespace,
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "tick"},
            "spec": {
                "schedule": "*/1 * * * *",
                "jobTemplate": {
                    "spec": {
                        "template": {
                            "spec": {
                                "restartPolicy": "Never",
                                "containers": [{"name": "main", "image": "busybox", "command": ["true"]}],
                            }
                        }
                    }
                },
            },
        },
    )
    # The next minute boundary is up to 60 s away; the rest is the CronJob controller's latency on a loaded machine.
    jobs = eventually(lambda: batch.list_namespaced_job(namespace).items, 180, "a Job from the CronJob")
    assert jobs[0].metadata.owner_references[0].kind == "CronJob"


def test_pods_asking_for_manual_completion_wait_for_the_test(cluster: Cluster) -> None:
    namespace = fresh_namespace(cluster.control_plane)
    core = client.CoreV1Api(api(cluster.control_plane))
    batch = client.BatchV1Api(api(cluster.control_plane))
    template = {
        "metadata": {"annotations": {MANUAL_COMPLETION_ANNOTATION: "true"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "x", "command": ["true"]}]},
    }
    batch.create_namespaced_job(
        namespace,
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "manual"}, "spec": {"template": template}},
    )
    pod = eventually(
        lambda: [p for p in core.list_namespaced_pod(namespace).items if p.status.phase == "Running"],
        120,
        "Running pod",
    )[0]
    time.sleep(3)
    assert core.read_namespaced_pod(pod.metadata.name, namespace).status.phase == "Running"
    complete_pod(core, pod.metadata.name, namespace, exit_code=0)
    eventually(
        lambda: (batch.read_namespaced_job_status("manual", namespace).status.succeeded or 0) == 1, 120, "Job done"
    )
