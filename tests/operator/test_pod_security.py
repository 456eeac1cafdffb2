"""Pod Security "restricted": every pod template the operator renders (inference Deployment, schedule
CronJob, every stage Job in every Spark mode) is dry-run as a Pod in a namespace that enforces the
restricted profile. Admission enforces only on Pods (workload objects merely warn), hence the Pods."""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import pytest
from latentmas.cycle import cycle_runs
from latentmas.operator.children import StackRef, desired_children
from latentmas.operator.stagejobs import stage_object
from latentmas.spec import LatentMASStackSpec
from latentmas.testing.binaries import binary
from latentmas.testing.controlplane import ControlPlane

from tests.operator.conftest import new_namespace

pytestmark = pytest.mark.operator

SPECS = {
    "python": {"experts": [{"name": "law", "domain": "law"}], "schedule": {"cron": "0 3 * * *"}},
    "spark-local": {"experts": [{"name": "law", "domain": "law"}], "pipeline": {"cleaning": {"engine": "spark"}}},
    "spark-submit": {
        "storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "creds"}},
        "experts": [{"name": "law", "domain": "law"}, {"name": "med", "domain": "med"}],
        "pipeline": {"cleaning": {"engine": "spark", "sparkExecutors": 3}},
        "inference": {"authSecretRef": "token", "resources": {"gpu": 2}},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates inside a workload object (none for other kinds)."""
    spec = obj.get("spec") or {}
    if obj["kind"] in ("Deployment", "Job"):
        return [spec["template"]]
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    return []


def rendered_pods(namespace: str) -> list[dict[str, Any]]:
    pods = []
    for label, body in SPECS.items():
        spec = LatentMASStackSpec.model_validate(body)
        ref = StackRef(f"team-{label}", namespace, "0f1e2d3c-0000-0000-0000-000000000001")
        objects = desired_children(ref, spec, "latentmas-operator:test")
        objects += [stage_object(ref, spec, "c1-0f1e2d3c", run, 1, spark_operator=False) for run in cycle_runs(spec)]
        for obj in objects:
            for template in pod_templates(obj):
                name = f"{obj['metadata']['name']}-{obj['kind'].lower()}"[:63].rstrip("-")
                metadata = {"name": name, "namespace": namespace, "labels": template["metadata"].get("labels", {})}
                pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
    return pods


def dry_run(plane: ControlPlane, pod: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("kubectl"), "--kubeconfig", str(plane.kubeconfig), "create", "--dry-run=server", "-f", "-"],
        input=json.dumps(pod),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_rendered_pod_passes_the_restricted_profile(control_plane: ControlPlane) -> None:
    namespace = new_namespace(control_plane)
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    pods = rendered_pods(namespace)
    kinds = {pod["metadata"]["name"].rsplit("-", 1)[-1] for pod in pods}
    assert kinds == {"deployment", "job", "cronjob"} and len(pods) >= 25
    refused = {pod["metadata"]["name"]: done.stderr for pod in pods if (done := dry_run(control_plane, pod)).returncode}
    assert refused == {}
    # The check can fail: the same pod without its seccomp profile is refused by the namespace.
    weakened = copy.deepcopy(pods[0])
    weakened["spec"].pop("securityContext")
    for container in weakened["spec"]["containers"]:
        container["securityContext"].pop("seccompProfile")
    done = dry_run(control_plane, weakened)
    assert done.returncode != 0 and "seccompProfile" in done.stderr and "restricted" in done.stderr
