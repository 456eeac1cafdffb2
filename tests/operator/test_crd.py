"""The CRD is generated from the spec models, checked in, and enforced by the real API server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from latentmas.crd import crd, crd_yaml
from latentmas.names import RESERVED_EXPERT_NAMES
from latentmas.operator import kube
from latentmas.testing.controlplane import ControlPlane
from latentmas.testing.procs import eventually

from tests.operator.conftest import CRD_FILE, REPO

pytestmark = pytest.mark.operator

CHART_CRD = REPO / "charts" / "latentmas" / "files" / "latentmasstack.yaml"
VALID_SPEC = {
    "storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "s3"}},
    "experts": [{"name": "law", "domain": "law"}],
}


def test_latentmas_crd_command_equals_checked_in_files() -> None:
    printed = subprocess.run(
        [sys.executable, "-c", "from latentmas.cli import main; main()", "crd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed == crd_yaml()
    assert CRD_FILE.read_text() == printed, (
        "crds/latentmasstack.yaml drifted: run `latentmas crd > crds/latentmasstack.yaml`"
    )
    assert CHART_CRD.read_text() == printed, "the chart's CRD copy drifted from crds/latentmasstack.yaml"


def test_crd_is_structural_with_status_columns_and_short_name() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Cycle", "Last", "Experts", "Ready", "Reason", "Endpoint", "Age"]
    assert crd()["spec"]["names"]["shortNames"] == ["lms"]

    def walk(node: dict, path: str) -> None:
        assert "type" in node or "x-kubernetes-preserve-unknown-fields" in node, f"{path} has no type"
        assert not {"$ref", "anyOf", "allOf", "title"} & set(node), f"{path} is not structural"
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    walk(version["schema"]["openAPIV3Schema"], "")


def _create(api: client.ApiClient, namespace: str, spec: dict, name: str = "s") -> dict:
    body = {"apiVersion": "latentmas.io/v1alpha1", "kind": "LatentMASStack", "metadata": {"name": name}, "spec": spec}
    return kube.request(api, "POST", f"/apis/latentmas.io/v1alpha1/namespaces/{namespace}/latentmasstacks", body)


def test_api_server_fills_defaults_from_the_models(control_plane: ControlPlane, crd_installed: Path, api) -> None:
    namespace = f"crd-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", namespace)
    created = _create(api, namespace, VALID_SPEC)
    spec = created["spec"]
    assert spec["pipeline"]["retry"] == {"retries": 2, "backoffSeconds": 10, "deadlineSeconds": 3600}
    assert spec["experts"][0]["lora"]["rank"] == 8
    assert spec["storage"]["artifactPolicy"] == "Retain"
    assert spec["inference"]["resources"]["gpu"] == 1
    table = control_plane.kubectl("get", "lms", "-n", namespace)
    assert table.split()[:7] == ["NAME", "PHASE", "CYCLE", "EXPERTS", "READY", "REASON", "AGE"]


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        (
            {"experts": [{"name": "law", "domain": "law", "lora": {"rank": 0}}]},
            "spec.experts[0].lora.rank",
            "greater than or equal to 1",
        ),
        ({"experts": [{"name": "Law!", "domain": "law"}]}, "spec.experts[0].name", "should match"),
        (
            {"experts": [{"name": "a", "domain": "x"}, {"name": "a", "domain": "y"}]},
            "spec.experts[1]",
            "Duplicate value",
        ),
        (
            {"storage": {"endpoint": "minio:9000"}},
            "spec.storage.credentialsSecretRef",
            "credentialsSecretRef is required",
        ),
        (
            {"pipeline": {"cleaning": {"chunkChars": 200, "chunkOverlap": 300}}},
            "spec.pipeline.cleaning",
            "chunkOverlap must be smaller",
        ),
        ({"stages": {"cleaning": {"retries": 1}}}, "spec", "stages keys must be stage names"),
        *(
            ({"experts": [{"name": name, "domain": "law"}]}, "spec.experts[0].name", "name is reserved")
            for name in sorted(RESERVED_EXPERT_NAMES)
        ),
        (
            {"experts": [{"name": "a", "domain": "law"}, {"name": "b", "domain": "law"}]},
            "spec.experts",
            "experts must have distinct domains",
        ),
        ({"schedule": {"cron": "every day"}}, "spec.schedule.cron", "should match"),
        ({"inference": {"routingMode": "top3"}}, "spec.inference.routingMode", "Unsupported value"),
        (
            {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]},
            "spec.tolerations[0]",
            "value must be empty",
        ),
        # Values the API server used to accept but the operator or Kubernetes could not use.
        ({"schedule": {"cron": "0 3 * * *", "timeZone": "Mars/Phobos"}}, "spec.schedule.timeZone", "should match"),
        ({"schedule": {"cron": "61 * * * *"}}, "spec.schedule.cron", "should match"),
        ({"schedule": {"cron": "0 24 * * mon"}}, "spec.schedule.cron", "should match"),
        ({"schedule": {"cron": "0 0 30 2 *"}}, "spec.schedule.cron", "never fires"),
        ({"schedule": {"cron": "0 0 31 nov *"}}, "spec.schedule.cron", "never fires"),
        (
            {"storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "Bad_Name"}}},
            "spec.storage.credentialsSecretRef.name",
            "should match",
        ),
        (
            {"storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": ""}}},
            "spec.storage.credentialsSecretRef.name",
            "should match",
        ),
        (
            {"storage": {"endpoint": "file:///var/data", "credentialsSecretRef": {"name": "s3"}}},
            "spec.storage.endpoint",
            "local runs only",
        ),
        ({"inference": {"authSecretRef": "not valid"}}, "spec.inference.authSecretRef", "should match"),
        ({"inference": {"image": ""}}, "spec.inference.image", "at least 1"),
        ({"pipeline": {"training": {"image": "a b"}}}, "spec.pipeline.training.image", "should match"),
        (
            {"inference": {"resources": {"gpu": 1, "gpuResourceName": "cpu"}}},
            "spec.inference.resources.gpuResourceName",
            "not a core resource",
        ),
        ({"nodeSelector": {"bad key!": "x"}}, "spec.nodeSelector", "qualified names"),
        ({"nodeSelector": {"pool": "has space"}}, "spec.nodeSelector.pool", "should match"),
        ({"stagePodAnnotations": {"/nope": "x"}}, "spec.stagePodAnnotations", "qualified names"),
        ({"tolerations": [{"operator": "Equal", "value": "x"}]}, "spec.tolerations[0]", "operator must be Exists"),
        ({"tolerations": [{"key": "gpu", "value": "a b"}]}, "spec.tolerations[0].value", "should match"),
    ],
)
def test_invalid_spec_is_rejected_with_a_field_message(
    control_plane: ControlPlane, crd_installed: Path, api, patch: dict, field: str, message: str
) -> None:
    namespace = "default"
    with pytest.raises(client.ApiException) as rejected:
        _create(api, namespace, {**VALID_SPEC, **patch}, name=f"bad-{uuid.uuid4().hex[:6]}")
    assert rejected.value.status == 422
    causes = json.loads(rejected.value.body)["details"]["causes"]
    assert any(c["field"] == field and message in c["message"] for c in causes), causes


def test_long_stack_names_are_rejected(control_plane: ControlPlane, crd_installed: Path) -> None:
    body = {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": "x" * 41},
        "spec": VALID_SPEC,
    }
    done = subprocess.run(
        [*control_plane_kubectl(control_plane), "apply", "-f", "-"],
        input=yaml.safe_dump(body),
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "metadata.name must be at most 40 characters" in done.stderr


def control_plane_kubectl(plane: ControlPlane) -> list[str]:
    from latentmas.testing.binaries import binary

    return [binary("kubectl"), "--kubeconfig", str(plane.kubeconfig)]


def _spec_properties(node: dict, path: str) -> list[tuple[str, dict]]:
    found = []
    for name, child in (node.get("properties") or {}).items():
        found.append((f"{path}.{name}", child))
        found += _spec_properties(child, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(node.get(key), dict):
            found += _spec_properties(node[key], path + suffix)
    return found


def test_every_spec_field_has_a_description_and_conditions_are_a_list_map() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fields = _spec_properties(schema["properties"]["spec"], "spec")
    assert len(fields) > 130
    undocumented = [path for path, node in fields if not node.get("description")]
    assert undocumented == [], f"no description for kubectl explain: {undocumented}"
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_kubectl_explain_and_wide_columns_on_the_api_server(
    control_plane: ControlPlane, crd_installed: Path, api
) -> None:
    def explain(field: str) -> str:
        return eventually(lambda: control_plane.kubectl("explain", field, check=False), 120, f"explain {field}")

    assert "vector and BM25 results are merged" in explain("lms.spec.pipeline.rag.fusion")
    assert "Taint effect matched" in explain("lms.spec.tolerations.effect")
    assert "Bucket where raw documents" in explain("lms.spec.storage.rawBucket")
    namespace = f"crd-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", namespace)
    _create(api, namespace, {"storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "s3"}},
                             "experts": [{"name": "law", "domain": "law"}]}, name="wide")  # fmt: skip
    ready = {"type": "Ready", "status": "False", "reason": "NotPromoted", "message": ""}
    ready["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    patch = {"status": {"endpoint": "http://wide-inference.x.svc:8000", "conditions": [ready]}}
    control_plane.kubectl(
        "patch", "lms/wide", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )
    header, row = control_plane.kubectl("get", "lms/wide", "-n", namespace, "-o", "wide").splitlines()[:2]

    def column(name: str) -> str:  # columns may be empty: cut the row at the header's offsets
        start = header.index(name)
        rest = header[start + len(name) :]
        end = start + len(name) + len(rest) - len(rest.lstrip()) if rest.strip() else len(row)
        return row[start:end].strip()

    assert (column("READY"), column("REASON")) == ("False", "NotPromoted")
    assert column("ENDPOINT") == "http://wide-inference.x.svc:8000"
