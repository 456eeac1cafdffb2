"""Publishes the versions this pod serves as an annotation on its own Pod, which the operator reads to
show target vs active versions per pod (docs/serving.md: "Active versions for the operator")."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

ANNOTATION = "latentmas.io/active-versions"
log = logging.getLogger("latentmas.services.podstatus")


def annotation_value(versions: dict[str, int | None]) -> str:
    """Stable JSON, so an unchanged set of versions yields an identical annotation (no-op patches)."""
    return json.dumps({k: v for k, v in sorted(versions.items()) if v is not None}, separators=(",", ":"))


class PodAnnotationPublisher:
    """Patches `metadata.annotations[latentmas.io/active-versions]` of POD_NAMESPACE/POD_NAME."""

    def __init__(self, pod_name: str, pod_namespace: str, kubeconfig: Path | None = None) -> None:
        from kubernetes import client, config

        if kubeconfig is not None:
            api_client = config.new_client_from_config(config_file=str(kubeconfig))
        else:
            config.load_incluster_config()
            api_client = client.ApiClient()
        self.api = client.CoreV1Api(api_client)
        self.pod_name, self.pod_namespace = pod_name, pod_namespace
        self.last: str | None = None

    @classmethod
    def from_env(cls) -> PodAnnotationPublisher | None:
        """Only inside a pod that knows its own name (Downward API env POD_NAME / POD_NAMESPACE)."""
        name, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
        if not name or not namespace:
            return None
        kubeconfig = os.environ.get("LATENTMAS_KUBECONFIG")
        return cls(name, namespace, Path(kubeconfig) if kubeconfig else None)

    def publish(self, versions: dict[str, int | None]) -> bool:
        """Returns True when a patch was sent; unchanged values are not re-sent."""
        value = annotation_value(versions)
        if value == self.last:
            return False
        body = {"metadata": {"annotations": {ANNOTATION: value}}}
        self.api.patch_namespaced_pod(self.pod_name, self.pod_namespace, body)
        self.last = value
        return True
