"""Per-stage resources and placement, podFailurePolicy, priority class, image pull Secrets, image
defaults left to the operator's release, and stage configs from a newer operator refused in one line."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from latentmas.cycle import StageRun
from latentmas.operator.children import StackRef, desired_children
from latentmas.operator.stagejobs import stage_object
from latentmas.spec import InferenceSpec, LatentMASStackSpec
from latentmas.stage import load_stage_config
from latentmas.testing.controlplane import ControlPlane

from tests.operator.conftest import get_stack

pytestmark = pytest.mark.operator

REF = StackRef("team", "ns", "0f1e2d3c-aaaa-bbbb-cccc-000000000001")
GPU_POOL = {"pool": "gpu"}
TAINT = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _spec(**extra: Any) -> LatentMASStackSpec:
    body: dict[str, Any] = {
        "experts": [{"name": "law", "domain": "law"}],
        "nodeSelector": GPU_POOL,
        "tolerations": TAINT,
        "priorityClassName": "latentmas-high",
        "imagePullSecrets": ["registry"],
        "schedule": {"cron": "0 3 * * *"},
        "pipeline": {"training": {"resources": {"cpu": "2", "memory": "8Gi", "gpu": 1}}},
        **extra,
    }
    return LatentMASStackSpec.model_validate(body)


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    return (spec.get("jobTemplate", {}).get("spec") or spec)["template"]["spec"]


def _child(spec: LatentMASStackSpec, kind: str) -> dict[str, Any]:
    return next(o for o in desired_children(REF, spec, "img") if o["kind"] == kind)


def test_stack_placement_only_on_gpu_pods_unless_a_stage_sets_its_own() -> None:
    spec = _spec(stages={"clean": {"nodeSelector": {"pool": "cpu"}, "resources": {"cpu": "3", "memory": "5Gi"}}})
    train = _pod(stage_object(REF, spec, "c1", StageRun("train", "law"), 1, False))
    assert train["nodeSelector"] == GPU_POOL and train["tolerations"] == TAINT
    quant = _pod(stage_object(REF, spec, "c1", StageRun("quant"), 1, False))
    assert "nodeSelector" not in quant and "tolerations" not in quant, "a CPU stage is not pinned to GPU nodes"
    clean = _pod(stage_object(REF, spec, "c1", StageRun("clean"), 1, False))
    assert clean["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in clean
    assert clean["containers"][0]["resources"]["requests"] == {"cpu": "3", "memory": "5Gi"}
    inference = _pod(_child(spec, "Deployment"))
    assert inference["nodeSelector"] == GPU_POOL, "the inference pods request a GPU"
    cpu_serving = _spec(inference={"resources": {"cpu": "2", "memory": "4Gi", "gpu": 0}})
    assert "nodeSelector" not in _pod(_child(cpu_serving, "Deployment"))
    assert "nodeSelector" not in _pod(_child(spec, "CronJob"))


def test_every_pod_gets_priority_class_and_pull_secrets_and_jobs_a_pod_failure_policy() -> None:
    spec = _spec()
    job = stage_object(REF, spec, "c1", StageRun("clean"), 1, False)
    for obj in (job, _child(spec, "Deployment"), _child(spec, "CronJob")):
        pod = _pod(obj)
        assert pod["priorityClassName"] == "latentmas-high", obj["kind"]
        assert pod["imagePullSecrets"] == [{"name": "registry"}], obj["kind"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
    assert job["spec"]["backoffLimit"] == 0 and _pod(job)["restartPolicy"] == "Never"
    bare = LatentMASStackSpec.model_validate({"experts": [{"name": "law", "domain": "law"}]})
    pod = _pod(_child(bare, "Deployment"))
    assert "priorityClassName" not in pod and "imagePullSecrets" not in pod


def test_image_defaults_are_not_stored_in_the_object(
    control_plane: ControlPlane, crd_installed: Path, api: Any
) -> None:
    """The API server fills defaults into stored objects; images must not be among them, or every stack
    would keep the image of the release that created it after the operator is upgraded."""
    from latentmas.operator import kube

    namespace = f"skew-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", namespace)
    body = {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": "skew", "namespace": namespace},
        "spec": {
            "storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "s3"}},
            "experts": [{"name": "law", "domain": "law"}],
        },
    }
    kube.request(api, "POST", f"/apis/latentmas.io/v1alpha1/namespaces/{namespace}/latentmasstacks", body)
    stored = get_stack(api, namespace, "skew")["spec"]
    assert "image" not in stored["inference"] and "image" not in stored["pipeline"]["training"]
    assert stored["inference"]["replicas"] == 1, "other defaults are still filled in"
    spec = LatentMASStackSpec.model_validate(stored)
    image = _pod(_child(spec, "Deployment"))["containers"][0]["image"]
    assert image == InferenceSpec().image, "the operator release's own image"


def test_a_stage_config_from_a_newer_operator_is_refused_in_one_line() -> None:
    data = {
        "namespace": "a",
        "stack": "s",
        "cycleId": "c1",
        "futureField": 1,
        "spec": {"experts": [{"name": "law", "domain": "law"}], "newSpecField": "x"},
    }
    with pytest.raises(ValueError) as err:
        load_stage_config(data, "--config /etc/latentmas/clean.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("--config /etc/latentmas/clean.yaml: unknown field(s)")
    assert "spec.newSpecField" in message and "futureField" in message and "newer operator" in message
    data = {"namespace": "a", "stack": "s", "cycleId": "c1", "spec": {"experts": []}}
    with pytest.raises(ValueError, match=r"^x: spec.experts: .*at least 1"):
        load_stage_config(data, "x")
