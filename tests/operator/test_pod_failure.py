"""The stage Jobs' podFailurePolicy on the real Job controller (kube-controller-manager; kwok plays the node and
this test the kubelet of a manually completed stage Pod): a Pod evicted through the Eviction API, as a node
drain does, carries the API server's `DisruptionTarget` condition and is replaced without using up the Job's
single try (backoffLimit 0) or the operator's attempt; a Pod whose container exits non-zero is counted, the Job
fails and the operator starts its next attempt as a new Job."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from latentmas.operator import names
from latentmas.testing.controlplane import MANUAL_COMPLETION_ANNOTATION, Cluster, complete_pod
from latentmas.testing.fixtures import MinioFixture
from latentmas.testing.procs import eventually

from tests.operator.conftest import OperatorProcess, apply_yaml, get_stack, new_namespace, stack_body

pytestmark = [pytest.mark.operator, pytest.mark.e2e]
NAME = "drain"
KILLED = 137  # what a container stopped by SIGKILL at the end of its grace period exits with


def _pods(core: client.CoreV1Api, namespace: str, job: str) -> list[Any]:
    pods: list[Any] = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    return pods


def _running(core: client.CoreV1Api, namespace: str, job: str, other_than: str = "") -> str | None:
    for pod in _pods(core, namespace, job):
        if pod.metadata.name != other_than and pod.status.phase == "Running" and not pod.metadata.deletion_timestamp:
            return str(pod.metadata.name)
    return None


def _disrupted(core: client.CoreV1Api, namespace: str, pod: str) -> bool:
    found = core.read_namespaced_pod(pod, namespace)
    conditions = found.status.conditions or []
    marked = any(c.type == "DisruptionTarget" and c.status == "True" for c in conditions)
    return marked and found.metadata.deletion_timestamp is not None


def _clean_run(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    cycle = get_stack(api, namespace, NAME).get("status", {}).get("cycle") or {}
    run: dict[str, Any] = (cycle.get("stages") or {}).get("clean") or {}
    return run


def test_an_evicted_stage_pod_is_replaced_and_a_failed_one_counted(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    namespace = new_namespace(cluster.control_plane, minio)
    body = stack_body(
        NAME,
        namespace,
        minio,
        stagePodAnnotations={MANUAL_COMPLETION_ANNOTATION: "true"},
        pipeline={"retry": {"retries": 1, "backoffSeconds": 1, "deadlineSeconds": 600}},
    )
    apply_yaml(cluster.control_plane, body)
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        "latentmas.io", "v1alpha1", namespace, "latentmasstacks", NAME,
        {"metadata": {"annotations": {"latentmas.io/evolve": "drain"}}},
    )  # fmt: skip
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    cycle = eventually(
        lambda: (get_stack(api, namespace, NAME).get("status", {}).get("cycle") or {}).get("id"), 120, "a cycle"
    )
    first_job = names.job_name(NAME, cycle, "clean", 1)
    evicted = eventually(lambda: _running(core, namespace, first_job), 120, "the clean stage's pod running")

    # A node drain: the Eviction API marks the pod DisruptionTarget and deletes it; the kubelet stops its container.
    eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=evicted, namespace=namespace))
    core.create_namespaced_pod_eviction(evicted, namespace, eviction)
    eventually(lambda: _disrupted(core, namespace, evicted), 120, "the evicted pod marked DisruptionTarget")
    complete_pod(core, evicted, namespace, exit_code=KILLED)

    replacement = eventually(
        lambda: _running(core, namespace, first_job, other_than=evicted), 120, "a replacement pod in the same Job"
    )
    job = batch.read_namespaced_job(first_job, namespace)
    assert not job.status.failed and not [c for c in job.status.conditions or [] if c.type == "Failed"]
    run = _clean_run(api, namespace)
    assert run["attempts"] == 1 and run["state"] == "Running" and run["jobName"] == first_job, run

    # A real failure of the replacement (non-zero exit, no DisruptionTarget) is counted: the Job fails ...
    complete_pod(core, replacement, namespace, exit_code=1)

    def failed_job() -> Any:
        found = batch.read_namespaced_job(first_job, namespace)
        conditions = {c.type: c for c in found.status.conditions or []}
        failed = conditions.get("Failed")
        return found if failed is not None and failed.status == "True" else None

    job = eventually(failed_job, 120, f"Job {first_job} failed")
    assert job.status.failed == 1, job.status
    assert {c.reason for c in job.status.conditions if c.type == "Failed"} == {"BackoffLimitExceeded"}
    # ... and the operator spends its retry on a new Job.
    second_job = names.job_name(NAME, cycle, "clean", 2)
    eventually(lambda: _running(core, namespace, second_job), 120, "the second attempt's pod")
    eventually(lambda: _clean_run(api, namespace)["attempts"] == 2, 120, "the operator counting a second attempt")
