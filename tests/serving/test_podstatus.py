"""Active versions per pod: the server annotates its own Pod on the real kube-apiserver."""

from __future__ import annotations

import json

import pytest
from kubernetes import client, config
from latentmas.services.podstatus import ANNOTATION, PodAnnotationPublisher
from latentmas.testing.controlplane import ControlPlane
from latentmas.testing.procs import eventually

from tests.serving.conftest import Stack, Toy

pytestmark = pytest.mark.serving


def _pod_api(control_plane: ControlPlane) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(config_file=str(control_plane.kubeconfig)))


def _make_pod(api: client.CoreV1Api, name: str) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "inference", "image": "latentmas:test"}]},
    }
    api.create_namespaced_pod("default", body)


def _annotation(api: client.CoreV1Api, name: str) -> dict[str, int] | None:
    annotations = api.read_namespaced_pod(name, "default").metadata.annotations or {}
    return json.loads(annotations[ANNOTATION]) if ANNOTATION in annotations else None


def test_publisher_patches_only_on_change(control_plane: ControlPlane) -> None:
    api = _pod_api(control_plane)
    _make_pod(api, "inference-publisher")
    publisher = PodAnnotationPublisher("inference-publisher", "default", control_plane.kubeconfig)
    assert publisher.publish({"finance": 3, "router": 1, "index": None})
    assert _annotation(api, "inference-publisher") == {"finance": 3, "router": 1}
    assert not publisher.publish({"router": 1, "finance": 3})  # same versions: no patch
    assert publisher.publish({"finance": 4, "router": 1})
    assert _annotation(api, "inference-publisher") == {"finance": 4, "router": 1}


def test_server_reports_active_versions_on_its_pod(
    control_plane: ControlPlane, stack: Stack, toy: Toy, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = _pod_api(control_plane)
    _make_pod(api, "inference-0")
    monkeypatch.setenv("POD_NAME", "inference-0")
    monkeypatch.setenv("POD_NAMESPACE", "default")
    monkeypatch.setenv("LATENTMAS_KUBECONFIG", str(control_plane.kubeconfig))
    stack.publish("experts", "finance", toy.adapters["seed1"])
    serve(stack)
    _wait_for(api, {"base": 1, "finance": 1})
    stack.publish("experts", "legal", toy.adapters["seed2"])
    stack.publish("experts", "finance", toy.adapters["seed3"])
    _wait_for(api, {"base": 1, "finance": 2, "legal": 1})


def _wait_for(api: client.CoreV1Api, expected: dict[str, int]) -> None:
    eventually(lambda: _annotation(api, "inference-0") == expected, 120, f"versions {expected} annotated", 0.1)


def test_configmap_publishers_keep_each_others_entries_and_carry_reload_errors(control_plane: ControlPlane) -> None:
    from latentmas.services.podstatus import ConfigMapPublisher, parse_entry

    api = _pod_api(control_plane)
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "team-active-versions"}}
    api.create_namespaced_config_map("default", body)
    first = ConfigMapPublisher("inference-a", "default", "team-active-versions", control_plane.kubeconfig)
    second = ConfigMapPublisher("inference-b", "default", "team-active-versions", control_plane.kubeconfig)
    assert first.publish({"finance": 3, "router": None})
    assert second.publish({"finance": 2}, {"finance": "version 3: lora_B has non-finite values"})
    assert not first.publish({"finance": 3})  # unchanged: no patch
    data = api.read_namespaced_config_map("team-active-versions", "default").data
    assert parse_entry(data["inference-a"]) == ({"finance": 3}, {})
    assert parse_entry(data["inference-b"]) == ({"finance": 2}, {"finance": "version 3: lora_B has non-finite values"})
