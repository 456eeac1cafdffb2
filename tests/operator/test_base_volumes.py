"""A base on a PersistentVolumeClaim is mounted read-only in every pod that loads it; a hub token only in the
base stage's pod, by Secret reference."""

from __future__ import annotations

import pytest
from latentmas.cycle import StageRun
from latentmas.operator.children import StackRef, inference_deployment
from latentmas.operator.stagejobs import stage_job
from latentmas.spec import LatentMASStackSpec

pytestmark = pytest.mark.operator
STACK = StackRef("team", "ns", "uid")


def spec(uri: str, token: str | None = None) -> LatentMASStackSpec:
    base: dict[str, object] = {"uri": uri}
    if token:
        base["tokenSecretRef"] = token
    return LatentMASStackSpec.model_validate({"baseModel": base, "experts": [{"name": "a", "domain": "a"}]})


def pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def test_pvc_base_is_mounted_read_only_where_the_base_is_loaded() -> None:
    stack = spec("pvc://weights/llama/8b")
    claim = {"name": "base-model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
    mount = {"name": "base-model", "mountPath": "/mnt/latentmas/pvc/weights", "readOnly": True}
    for run in (StageRun("base"), StageRun("train", "a"), StageRun("router"), StageRun("evaluate")):
        spec_ = pod(stage_job(STACK, stack, "c1", run, 1, "none"))
        assert claim in spec_["volumes"] and mount in spec_["containers"][0]["volumeMounts"], run
    clean = pod(stage_job(STACK, stack, "c1", StageRun("clean"), 1, "none"))
    assert claim not in clean["volumes"]
    serving = pod(inference_deployment(STACK, stack))
    assert claim in serving["volumes"] and mount in serving["containers"][0]["volumeMounts"]


def test_other_sources_mount_nothing_and_the_token_reaches_only_the_base_stage() -> None:
    stack = spec("hf://org/model@main", token="hub-token")
    base = pod(stage_job(STACK, stack, "c1", StageRun("base"), 1, "none"))
    assert not [v for v in base["volumes"] if v["name"] == "base-model"]
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "token"}}}
    assert token in base["containers"][0]["env"]
    train = pod(stage_job(STACK, stack, "c1", StageRun("train", "a"), 1, "none"))
    assert token not in train["containers"][0]["env"]
