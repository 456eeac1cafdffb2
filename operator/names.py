"""Names, labels and annotations of everything the operator owns. Names are deterministic, so
re-running a reconcile (or a restarted operator) finds the object it made instead of making another."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from latentmas.spec import GROUP

MAX_NAME = 63
PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "app.kubernetes.io/managed-by"
COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
OPERATOR_NAME = "latentmas-operator"
LABEL_STACK = f"{GROUP}/stack"
LABEL_CYCLE = f"{GROUP}/cycle"
LABEL_RUN = f"{GROUP}/run"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_ATTEMPT = f"{GROUP}/attempt"
ANNOTATION_EVOLVE = f"{GROUP}/evolve"
ANNOTATION_EVOLVE_SOURCE = f"{GROUP}/evolve-source"
ANNOTATION_ACTIVE_VERSIONS = f"{GROUP}/active-versions"
ANNOTATION_SERVING_CONFIG = f"{GROUP}/serving-config-hash"
FINALIZER = f"{GROUP}/artifacts"
CONFIG_DIR = "/etc/latentmas"


def child_name(*parts: str) -> str:
    """`a-b-c`, shortened with a hash suffix when longer than a DNS label allows."""
    name = "-".join(p for p in parts if p)
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"


def job_name(stack: str, cycle: str, run_id: str, attempt: int) -> str:
    return child_name(stack, cycle, run_id, str(attempt))


def cycle_configmap(stack: str, cycle: str) -> str:
    return child_name(stack, cycle, "stages")


def inference_name(stack: str) -> str:
    return child_name(stack, "inference")


def cronjob_name(stack: str) -> str:
    return child_name(stack, "evolve")


def active_versions_configmap(stack: str) -> str:
    """The one object inference pods may write: per pod, the versions served and reload errors."""
    return child_name(stack, "active-versions")


def service_account(stack: str, role: str) -> str:
    return child_name(stack, role)


def labels(stack: str, component: str, **extra: str) -> dict[str, str]:
    return {
        PART_OF: "latentmas",
        MANAGED_BY: OPERATOR_NAME,
        INSTANCE: stack,
        COMPONENT: component,
        LABEL_STACK: stack,
        **extra,
    }


def stable_hash(value: Any) -> str:
    """A short content hash of JSON-able data (spec sections, desired children)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
