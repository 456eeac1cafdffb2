"""What the operator saw in the cluster and in object storage for one stack, as plain data, so the
decisions in `plan` are pure functions testable without a cluster."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from latentmas.operator import names
from latentmas.registry import Registry
from latentmas.services.podstatus import parse_entry
from latentmas.spec import LatentMASStackSpec, StackStatus, StageProgress

RunState = Literal["active", "succeeded", "failed"]
SPARK_DONE = {"COMPLETED": "succeeded", "FAILED": "failed", "SUBMISSION_FAILED": "failed"}


@dataclass(frozen=True)
class RunObservation:
    """One stage attempt (a Job or a SparkApplication) found in the cluster."""

    name: str
    kind: Literal["Job", "SparkApplication"]
    cycle: str
    run_id: str
    attempt: int
    state: RunState
    started_at: datetime | None = None
    finished_at: datetime | None = None
    message: str = ""


@dataclass(frozen=True)
class TriggerJob:
    """A Job the stack's CronJob created: the schedule fired."""

    name: str
    created_at: datetime


@dataclass(frozen=True)
class StackInput:
    name: str
    namespace: str
    uid: str
    generation: int
    annotations: dict[str, str]
    finalizers: tuple[str, ...]
    deleting: bool
    spec: LatentMASStackSpec | None
    spec_error: str | None
    status: StackStatus
    status_error: str | None = None
    deleted_at: datetime | None = None


@dataclass
class Observed:
    now: datetime
    runs: list[RunObservation] = field(default_factory=list)
    manifests: frozenset[str] = frozenset()
    progress: dict[str, StageProgress] = field(default_factory=dict)
    store_error: str | None = None
    registry: Registry | None = None
    deployment_exists: bool = False
    ready_replicas: int = 0
    desired_replicas: int | None = None  # the Deployment's own count (an HPA's choice when autoscaling)
    pod_versions: list[dict[str, int]] = field(default_factory=list)
    reload_errors: dict[str, str] = field(default_factory=dict)  # adapter -> reload error a pod reported
    stale_version_entries: list[str] = field(default_factory=list)  # entries of pods that no longer exist
    rollout: str | None = None  # why the inference rollout is not finished; None when it is
    trigger_jobs: list[TriggerJob] = field(default_factory=list)
    last_schedule: datetime | None = None
    spark_operator: bool = False
    config_cycles: frozenset[str] = frozenset()
    storage_owner_read: bool = False
    raw_objects: int | None = None  # raw objects under the prefix, listed before a cycle's clean starts
    clean_digest: str | None = None  # rawDigest recorded by the running cycle's clean stage
    summaries: dict[str, str] = field(default_factory=dict)  # run id -> its manifest's one-line statusSummary
    storage_owner: str | None = None


def _time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def job_observation(job: dict[str, Any]) -> RunObservation | None:
    """A stage Job (as returned by the API) -> its attempt; None for Jobs that are not stage attempts."""
    labels = job["metadata"].get("labels") or {}
    if names.LABEL_RUN not in labels:
        return None
    status = job.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    state: RunState = "active"
    message = ""
    if "Complete" in conditions or ("SuccessCriteriaMet" in conditions and "Failed" not in conditions):
        state = "succeeded"
    elif "Failed" in conditions or "FailureTarget" in conditions:
        failed = conditions.get("Failed") or conditions["FailureTarget"]
        state, message = "failed", f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".strip(": ")
    finished = status.get("completionTime")
    if state == "failed":
        finished = (conditions.get("Failed") or conditions.get("FailureTarget") or {}).get("lastTransitionTime")
    return RunObservation(
        name=job["metadata"]["name"],
        kind="Job",
        cycle=labels.get(names.LABEL_CYCLE, ""),
        run_id=labels[names.LABEL_RUN],
        attempt=int(labels.get(names.LABEL_ATTEMPT, "1")),
        state=state,
        started_at=_time(status.get("startTime")),
        finished_at=_time(finished),
        message=message,
    )


def spark_observation(app: dict[str, Any]) -> RunObservation | None:
    labels = app["metadata"].get("labels") or {}
    if names.LABEL_RUN not in labels:
        return None
    status = app.get("status") or {}
    app_state = (status.get("applicationState") or {}).get("state", "")
    state: RunState = SPARK_DONE.get(app_state, "active")  # type: ignore[assignment]
    return RunObservation(
        name=app["metadata"]["name"],
        kind="SparkApplication",
        cycle=labels.get(names.LABEL_CYCLE, ""),
        run_id=labels[names.LABEL_RUN],
        attempt=int(labels.get(names.LABEL_ATTEMPT, "1")),
        state=state,
        started_at=_time(status.get("submissionTime")),
        finished_at=_time(status.get("terminationTime")),
        message=(status.get("applicationState") or {}).get("errorMessage", ""),
    )


def pod_versions(pod: dict[str, Any], entries: dict[str, str]) -> tuple[dict[str, int], dict[str, str]] | None:
    """(versions, reload errors) a ready inference pod reports: its entry in the active-versions
    ConfigMap, else (pods of an earlier release) its `latentmas.io/active-versions` annotation."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return None
    raw = entries.get(pod["metadata"]["name"]) or (pod["metadata"].get("annotations") or {}).get(
        names.ANNOTATION_ACTIVE_VERSIONS
    )
    if not raw:
        return {}, {}
    try:
        return parse_entry(raw)
    except json.JSONDecodeError:
        return {}, {}


def rollout_pending(deployment: dict[str, Any], replicas: int) -> str | None:
    """Why a Deployment's rollout has not finished (None when it has): the controller has not seen the
    latest template, pods are not all updated/ready, old pods remain, or the progress deadline passed."""
    meta, status = deployment["metadata"], deployment.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    progressing = conditions.get("Progressing") or {}
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        return f"rollout stuck: {progressing.get('message') or 'progress deadline exceeded'}"
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return "the Deployment controller has not observed the latest template"
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    if updated < replicas or ready < replicas or total > updated:
        return f"rollout in progress: {updated}/{replicas} updated, {ready} ready, {total - updated} old"
    return None
