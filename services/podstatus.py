"""Publishes what this inference pod serves (versions, and reload errors) for the operator, which shows
target vs active versions and the `AdaptersSynced` condition (docs/serving.md: "Active versions for
the operator").

The channel is one entry per pod (key = pod name) in the stack's ConfigMap `<stack>-active-versions`,
the only object the inference ServiceAccount may patch (RBAC `resourceNames`): pods cannot touch other
pods. Pods rendered by an earlier operator (no `LATENTMAS_STATUS_CONFIGMAP`) annotate their own Pod,
which that operator's Role still allows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

ANNOTATION = "latentmas.io/active-versions"
CONFIGMAP_ENV = "LATENTMAS_STATUS_CONFIGMAP"
log = logging.getLogger("latentmas.services.podstatus")


def annotation_value(versions: dict[str, int | None]) -> str:
    """Stable JSON, so an unchanged set of versions yields an identical annotation (no-op patches)."""
    return json.dumps({k: v for k, v in sorted(versions.items()) if v is not None}, separators=(",", ":"))


def entry_value(versions: dict[str, int | None], errors: dict[str, str] | None = None) -> str:
    """One pod's entry: `{"versions": {...}, "errors": {name: message}}`, stable JSON."""
    body = {"versions": json.loads(annotation_value(versions)), "errors": dict(sorted((errors or {}).items()))}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def parse_entry(raw: str) -> tuple[dict[str, int], dict[str, str]]:
    """(versions, errors) of one entry; an annotation-style plain version map is read as well."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        return {}, {}
    versions, errors = (value.get("versions") or {}, value.get("errors") or {}) if "versions" in value else (value, {})
    return (
        {str(k): int(v) for k, v in (versions or {}).items() if isinstance(v, int)},
        {str(k): str(v) for k, v in errors.items()},
    )


class Publisher(Protocol):
    def publish(self, versions: dict[str, int | None], errors: dict[str, str] | None = None) -> bool: ...


def _core_api(kubeconfig: Path | None) -> Any:
    from kubernetes import client, config

    if kubeconfig is not None:
        return client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    config.load_incluster_config()
    return client.CoreV1Api(client.ApiClient())


class ConfigMapPublisher:
    """Merge-patches `data[<pod name>]` of the stack's active-versions ConfigMap (other pods' keys stay)."""

    def __init__(self, pod_name: str, namespace: str, configmap: str, kubeconfig: Path | None = None) -> None:
        self.api = _core_api(kubeconfig)
        self.pod_name, self.namespace, self.configmap = pod_name, namespace, configmap
        self.last: str | None = None

    def publish(self, versions: dict[str, int | None], errors: dict[str, str] | None = None) -> bool:
        """Returns True when a patch was sent; unchanged values are not re-sent."""
        value = entry_value(versions, errors)
        if value == self.last:
            return False
        self.api.patch_namespaced_config_map(self.configmap, self.namespace, {"data": {self.pod_name: value}})
        self.last = value
        return True


class PodAnnotationPublisher:
    """Patches `metadata.annotations[latentmas.io/active-versions]` of its own Pod (earlier operators)."""

    def __init__(self, pod_name: str, pod_namespace: str, kubeconfig: Path | None = None) -> None:
        self.api = _core_api(kubeconfig)
        self.pod_name, self.pod_namespace = pod_name, pod_namespace
        self.last: str | None = None

    def publish(self, versions: dict[str, int | None], errors: dict[str, str] | None = None) -> bool:
        """Returns True when a patch was sent; unchanged values are not re-sent (errors are not carried)."""
        value = annotation_value(versions)
        if value == self.last:
            return False
        body = {"metadata": {"annotations": {ANNOTATION: value}}}
        self.api.patch_namespaced_pod(self.pod_name, self.pod_namespace, body)
        self.last = value
        return True


def publisher_from_env() -> Publisher | None:
    """Only inside a pod that knows its own name (Downward API env POD_NAME / POD_NAMESPACE)."""
    name, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
    if not name or not namespace:
        return None
    raw = os.environ.get("LATENTMAS_KUBECONFIG")
    kubeconfig = Path(raw) if raw else None
    configmap = os.environ.get(CONFIGMAP_ENV)
    if configmap:
        return ConfigMapPublisher(name, namespace, configmap, kubeconfig)
    return PodAnnotationPublisher(name, namespace, kubeconfig)
