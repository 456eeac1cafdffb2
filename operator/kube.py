"""Thin Kubernetes API helpers over the official client: one ApiClient, server-side apply of any
object by apiVersion/kind, create-if-absent and delete-if-present (both idempotent)."""

from __future__ import annotations

import json
import os
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

FIELD_MANAGER = "latentmas-operator"
REQUEST_TIMEOUT = 30
# kind -> (plural, namespaced) for every kind the operator writes.
KINDS: dict[str, str] = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Event": "events",
    "Secret": "secrets",
    "Pod": "pods",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Deployment": "deployments",
    "Job": "jobs",
    "CronJob": "cronjobs",
    "SparkApplication": "sparkapplications",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "LatentMASStack": "latentmasstacks",
}
API_VERSIONS: dict[str, str] = {
    "ConfigMap": "v1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "Secret": "v1",
    "Event": "v1",
    "Pod": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
    "SparkApplication": "sparkoperator.k8s.io/v1beta2",
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "LatentMASStack": "latentmas.io/v1alpha1",
}


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster credentials inside a pod, else the kubeconfig (flag, $KUBECONFIG or ~/.kube/config)."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()
        return client.ApiClient()
    api = config.new_client_from_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"))
    if not api.configuration.verify_ssl:
        # The kubeconfig itself asks for insecure-skip-tls-verify; warning on every request adds nothing.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return api


def path(kind: str, namespace: str, name: str | None = None, api_version: str | None = None) -> str:
    version = api_version or API_VERSIONS[kind]
    prefix = "/api/v1" if version == "v1" else f"/apis/{version}"
    base = f"{prefix}/namespaces/{namespace}/{KINDS[kind]}"
    return f"{base}/{name}" if name else base


def request(
    api: client.ApiClient,
    method: str,
    url: str,
    body: Any = None,
    content_type: str = "application/json",
    query: list[tuple[str, str]] | None = None,
) -> Any:
    """One API call returning the decoded JSON; raises ApiException like the typed client."""
    method, url, headers, payload, _ = api.param_serialize(
        method,
        url,
        query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(method, url, header_params=headers, body=payload, _request_timeout=REQUEST_TIMEOUT)
    data = response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(http_resp=response)
    return json.loads(data) if data else None


def apply(api: client.ApiClient, obj: dict[str, Any]) -> Any:
    """Server-side apply as the operator's field manager (force: the operator owns these fields)."""
    meta = obj["metadata"]
    url = path(obj["kind"], meta["namespace"], meta["name"], obj["apiVersion"])
    query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
    return request(api, "PATCH", url, obj, "application/apply-patch+yaml", query)


def create(api: client.ApiClient, obj: dict[str, Any]) -> bool:
    """Creates unless an object of that name exists; True when this call created it."""
    meta = obj["metadata"]
    try:
        request(api, "POST", path(obj["kind"], meta["namespace"], api_version=obj["apiVersion"]), obj)
    except ApiException as err:
        if err.status == 409:
            return False
        raise
    return True


def delete(api: client.ApiClient, kind: str, namespace: str, name: str) -> bool:
    """Deletes with background propagation (a Job takes its Pods along); False when already gone."""
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
    try:
        request(api, "DELETE", path(kind, namespace, name), body)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def get(api: client.ApiClient, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = request(api, "GET", path(kind, namespace, name))
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    return found


def list_objects(api: client.ApiClient, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
    result = request(api, "GET", path(kind, namespace), query=[("labelSelector", selector)])
    return list(result.get("items", []))


def patch(api: client.ApiClient, kind: str, namespace: str, name: str, body: Any, subresource: str = "") -> Any:
    """JSON patch when `body` is a list, merge patch otherwise."""
    content_type = "application/json-patch+json" if isinstance(body, list) else "application/merge-patch+json"
    url = path(kind, namespace, name) + (f"/{subresource}" if subresource else "")
    return request(api, "PATCH", url, body, content_type)
