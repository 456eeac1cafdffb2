"""The I/O around `plan`: read one stack, its children and its object storage; decide; write back.
Runs in a worker thread (the kubernetes and MinIO clients are blocking)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from latentmas.cycle import StageRun, cycle_runs
from latentmas.operator import kube, metrics, names
from latentmas.operator.breaker import CircuitBreaker
from latentmas.operator.observed import (
    Observed,
    StackInput,
    TriggerJob,
    job_observation,
    pod_versions,
    rollout_pending,
    spark_observation,
)
from latentmas.operator.offworker import OffWorker, Pending
from latentmas.operator.plan import Plan, Settings, degraded_with, failure_backoff, plan, reconcile_failed
from latentmas.operator.stagejobs import SPARK_APP_GROUP, SPARK_APP_PLURAL
from latentmas.registry import load_registry
from latentmas.spec import GROUP, KIND, PLURAL, VERSION, LatentMASStackSpec, StackStatus, StageProgress
from latentmas.stage import MANIFEST, PROGRESS, STATUS_SUMMARY, StageConfig, StageContext, owner_key
from latentmas.store import LocalStore, ObjectStore, S3Store, StoreError, delete_prefix
from pydantic import ValidationError

log = logging.getLogger("latentmas.operator")
SPARK_CRD = f"{SPARK_APP_PLURAL}.{SPARK_APP_GROUP}"
SPARK_CRD_TTL = 60.0
SECRET_TTL = 30.0  # a rotated credentials Secret is picked up within this time
CONFLICT_REQUEUE_SECONDS = 0.5
MAX_MESSAGE = 900
# What a storage read fills in (`Reconciler._read_store`).
STORE_FIELDS = (
    "store_error",
    "registry",
    "raw_objects",
    "storage_owner",
    "storage_owner_read",
    "manifests",
    "progress",
    "clean_digest",
    "summaries",
)


@dataclass
class StackObject:
    """The raw custom object plus its parsed view."""

    raw: dict[str, Any]
    view: StackInput


def parse_stack(raw: dict[str, Any]) -> StackInput:
    meta = raw["metadata"]
    spec: LatentMASStackSpec | None = None
    error: str | None = None
    try:
        spec = LatentMASStackSpec.model_validate(raw.get("spec") or {})
    except ValidationError as err:
        first = err.errors()[0]
        error = f"spec.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    status_error: str | None = None
    try:
        status = StackStatus.model_validate(raw.get("status") or {})
    except ValidationError as err:
        # Start over, but never reuse a cycle number (ids are per uid as well).
        first = err.errors()[0]
        status_error = f"status.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        started = (raw.get("status") or {}).get("cyclesStarted")
        status = StackStatus(cycles_started=started if isinstance(started, int) and started >= 0 else 0)
    return StackInput(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        generation=int(meta.get("generation", 0)),
        annotations=dict(meta.get("annotations") or {}),
        finalizers=tuple(meta.get("finalizers") or ()),
        deleting=bool(meta.get("deletionTimestamp")),
        deleted_at=_timestamp(meta.get("deletionTimestamp")),
        spec=spec,
        spec_error=error,
        status=status,
        status_error=status_error,
    )


def status_body(status: StackStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


class Reconciler:
    def __init__(self, api: client.ApiClient, settings: Settings) -> None:
        self.api = api
        self.settings = settings
        self._stores: dict[tuple[str, ...], tuple[float, ObjectStore]] = {}
        self._spark: tuple[float, bool] = (0.0, False)
        self._lock = threading.Lock()
        self.phases: dict[tuple[str, str], str] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.purge_failures: dict[tuple[str, str], int] = {}
        self.breaker = CircuitBreaker()
        self.storage: OffWorker[Observed] = OffWorker(settings.store_wait_seconds)
        self.purges: OffWorker[int] = OffWorker(settings.store_wait_seconds)

    def wake_on_storage(self, wake: Callable[[tuple[str, str]], None]) -> None:
        """Who to wake when a storage call ends after its reconcile stopped waiting."""
        self.storage.on_done = self.purges.on_done = wake

    def shutdown(self) -> None:
        self.storage.shutdown()
        self.purges.shutdown()

    # --- reading ---------------------------------------------------------------------------------------------

    def spark_operator_installed(self) -> bool:
        checked, present = self._spark
        if time.monotonic() - checked < SPARK_CRD_TTL:
            return present
        try:
            kube.request(self.api, "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{SPARK_CRD}")
            present = True
        except ApiException as err:
            if err.status not in (403, 404):
                raise
            present = False
        self._spark = (time.monotonic(), present)
        return present

    def store_for(self, namespace: str, spec: LatentMASStackSpec) -> ObjectStore:
        """The stack's object store, with credentials read from its Secret (kept in memory only)."""
        storage = spec.storage
        if storage.endpoint.startswith("file://"):
            return LocalStore(Path(storage.endpoint.removeprefix("file://")))
        ref = storage.credentials_secret_ref
        if ref is None:
            raise StoreError("storage.credentialsSecretRef is not set")
        key = (namespace, ref.name, storage.endpoint, str(storage.secure), storage.region)
        with self._lock:
            cached = self._stores.get(key)
            if cached is not None and time.monotonic() - cached[0] < SECRET_TTL:
                return cached[1]
        secret = kube.get(self.api, "Secret", namespace, ref.name)
        if secret is None:
            raise CredentialsMissing(f"Secret {namespace}/{ref.name} not found")
        data = secret.get("data") or {}
        try:
            access, secret_key = _b64(data[ref.access_key_key]), _b64(data[ref.secret_key_key])
        except KeyError as err:
            raise CredentialsMissing(f"Secret {namespace}/{ref.name} has no key {err}") from None
        http = _http_client(self.settings.store_connect_timeout, self.settings.store_read_timeout)
        store = S3Store(storage.endpoint, access, secret_key, storage.secure, storage.region, http)
        with self._lock:
            self._stores[key] = (time.monotonic(), store)
        return store

    def observe(self, stack: StackInput) -> Observed:
        ns, name = stack.namespace, stack.name
        observed = Observed(now=datetime.now(UTC))
        if stack.deleting:
            return observed  # the garbage collector removes the children; only the purge is left
        selector = f"{names.LABEL_STACK}={name}"
        for job in kube.list_objects(self.api, "Job", ns, selector):
            labels = job["metadata"].get("labels") or {}
            if labels.get(names.COMPONENT) == "trigger":
                created = datetime.fromisoformat(job["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
                observed.trigger_jobs.append(TriggerJob(job["metadata"]["name"], created))
            elif (run := job_observation(job)) is not None:
                observed.runs.append(run)
        observed.spark_operator = self.spark_operator_installed()
        if observed.spark_operator:
            for app in kube.list_objects(self.api, "SparkApplication", ns, selector):
                if (run := spark_observation(app)) is not None:
                    observed.runs.append(run)
        configmaps = kube.list_objects(self.api, "ConfigMap", ns, f"{selector},{names.COMPONENT}=stage-config")
        observed.config_cycles = frozenset(c["metadata"]["labels"].get(names.LABEL_CYCLE, "") for c in configmaps)
        spec = stack.spec
        if spec is None:
            return observed
        if spec.inference.enabled:
            deployment = kube.get(self.api, "Deployment", ns, names.inference_name(name))
            observed.deployment_exists = deployment is not None
            if deployment is not None:
                observed.ready_replicas = int((deployment.get("status") or {}).get("readyReplicas") or 0)
                scaled = spec.inference.autoscaling.enabled
                wanted = int(deployment["spec"].get("replicas") or 0) if scaled else spec.inference.replicas
                observed.desired_replicas = wanted
                observed.rollout = rollout_pending(deployment, wanted)
            # The entries first, then the pods: an entry whose pod is not listed is really stale.
            board = kube.get(self.api, "ConfigMap", ns, names.active_versions_configmap(name)) or {}
            entries = dict(board.get("data") or {})
            pods = kube.list_objects(self.api, "Pod", ns, f"{selector},{names.COMPONENT}=inference")
            for reported in (pod_versions(p, entries) for p in pods):
                if reported is not None:
                    observed.pod_versions.append(reported[0])
                    observed.reload_errors.update(reported[1])
            current = {p["metadata"]["name"] for p in pods}
            observed.stale_version_entries = sorted(k for k in entries if k not in current)
        if spec.schedule is not None:
            cron = kube.get(self.api, "CronJob", ns, names.cronjob_name(name))
            last = ((cron or {}).get("status") or {}).get("lastScheduleTime")
            observed.last_schedule = datetime.fromisoformat(last.replace("Z", "+00:00")) if last else None
        self._observe_store(stack, spec, observed)
        return observed

    def _observe_store(self, stack: StackInput, spec: LatentMASStackSpec, observed: Observed) -> None:
        """Storage reads run off the reconcile worker (`OffWorker`); the breaker keeps a failing endpoint
        from being contacted again for its backoff."""
        key = (stack.namespace, stack.name)
        blocked = self.breaker.blocked(key)
        if blocked is not None:
            observed.store_error = blocked
            return
        scratch = Observed(now=observed.now, runs=list(observed.runs))
        read = self.storage.run(key, lambda: self._guarded_read(key, stack, spec, scratch))
        for name in STORE_FIELDS:
            setattr(observed, name, getattr(read, name))

    def _guarded_read(
        self, key: tuple[str, str], stack: StackInput, spec: LatentMASStackSpec, into: Observed
    ) -> Observed:
        try:
            self._read_store(stack, spec, into)
        except StoreError as err:
            into.store_error = str(err)
            self.breaker.failed(key, str(err))
        else:
            self.breaker.succeeded(key)
        return into

    def _read_store(self, stack: StackInput, spec: LatentMASStackSpec, observed: Observed) -> None:
        """Owner, registry, raw presence, manifests and progress of the running cycle."""
        cycle = stack.status.cycle
        store = self.store_for(stack.namespace, spec)
        if stack.status.storage_uid != stack.uid:
            owner = owner_key(stack.namespace, stack.name)
            bucket = spec.storage.artifacts_bucket
            if store.bucket_exists(bucket) and store.exists(bucket, owner):
                observed.storage_owner = str(json.loads(store.get_bytes(bucket, owner)).get("uid") or "")
            observed.storage_owner_read = True
        promote = cycle.stages.get("promote") if cycle is not None else None
        if cycle is None or (promote is not None and promote.state != "Pending"):
            # registry.json only changes through promote: skip the read while a cycle is before it.
            observed.registry = load_registry(store, spec.storage.artifacts_bucket, stack.namespace, stack.name)
        if cycle is None or not any(r.cycle == cycle.id and r.run_id == "clean" for r in observed.runs):
            # Before a cycle's clean Job exists: is there any raw data at all (else NoNewData)?
            observed.raw_objects = _raw_objects(store, spec)
        if cycle is None:
            return
        tried = {(r.run_id, r.state) for r in observed.runs if r.cycle == cycle.id}
        manifests, progress, summaries = set(), {}, {}
        for run in cycle_runs(spec):
            record = cycle.stages.get(run.id)
            if record is not None and record.state == "Succeeded":
                continue
            states = {state for run_id, state in tried if run_id == run.id}
            if not states:
                continue
            context = self._context(stack, spec, cycle.id, run, store)
            if context.store.exists(context.bucket, context.key(MANIFEST)):
                manifests.add(run.id)
                manifest = json.loads(context.store.get_bytes(context.bucket, context.key(MANIFEST)))
                metrics = manifest.get("metrics") or {}
                if run.stage == "clean":
                    digest = metrics.get("rawDigest")
                    observed.clean_digest = str(digest) if digest else None
                if metrics.get(STATUS_SUMMARY):
                    summaries[run.id] = str(metrics[STATUS_SUMMARY])[:MAX_MESSAGE]
            elif "active" in states and context.store.exists(context.bucket, context.key(PROGRESS)):
                raw = json.loads(context.store.get_bytes(context.bucket, context.key(PROGRESS)))
                metrics_only = {
                    k: float(v)
                    for k, v in raw.items()
                    if isinstance(v, int | float) and k not in {"step", "total", "time"}
                }
                progress[run.id] = StageProgress(
                    step=int(raw.get("step", 0)), total=int(raw.get("total", 0)), metrics=metrics_only
                )
        observed.manifests, observed.progress, observed.summaries = frozenset(manifests), progress, summaries

    @staticmethod
    def _context(
        stack: StackInput, spec: LatentMASStackSpec, cycle: str, run: StageRun, store: ObjectStore
    ) -> StageContext:
        """The stage's own view of its prefix, so operator and stage agree on where the manifest is."""
        config = StageConfig(namespace=stack.namespace, stack=stack.name, cycle_id=cycle, expert=run.expert, spec=spec)
        return StageContext(run.stage, config, store, Path("."))

    # --- one reconcile ---------------------------------------------------------------------------------------

    def read(self, namespace: str, name: str) -> StackObject | None:
        url = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        try:
            raw = kube.request(self.api, "GET", url)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return StackObject(raw, parse_stack(raw))

    def reconcile(self, namespace: str, name: str) -> float | None:
        """Observe, decide, act; returns seconds until this stack wants to be looked at again. A failure
        is this stack's alone: Degraded with the API's message, a Warning event, exponential backoff."""
        started = time.perf_counter()
        key = (namespace, name)
        stack: StackObject | None = None
        try:
            stack = self.read(namespace, name)
            if stack is None:
                self.phases.pop(key, None)
                self.failures.pop(key, None)
                metrics.RECONCILES.labels("gone").inc()
                return None
            observed = self.observe(stack.view)
            decided = plan(stack.view, observed, self.settings)
            errors = self.execute(stack, decided)
            if errors:
                self._failed(stack, decided.status, errors)
            self.write_status(stack, decided.status)
        except Conflict as err:
            log.info("%s: reconciling again", err)
            return CONFLICT_REQUEUE_SECONDS
        except Pending:
            metrics.RECONCILES.labels("storage-pending").inc()
            return self.settings.poll_seconds  # the call's end wakes the stack sooner
        except Exception as err:
            metrics.RECONCILE_ERRORS.labels(type(err).__name__).inc()
            metrics.RECONCILES.labels("error").inc()
            message = _one_line(err)
            log.warning("reconcile %s/%s failed: %s", namespace, name, message)
            if stack is not None and not stack.view.deleting:
                self._report(stack, ActionError("reconcile", _status_code(err), message))
            return self._backoff(key)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        self.phases[key] = decided.status.phase
        phases = list(self.phases.values())
        for phase in ("Pending", "Evolving", "Ready", "Degraded"):
            metrics.STACKS.labels(phase).set(phases.count(phase))
        if errors:
            metrics.RECONCILES.labels("error").inc()
            return self._backoff(key)
        metrics.RECONCILES.labels("ok").inc()
        self.failures.pop(key, None)
        return decided.requeue_after

    def _backoff(self, key: tuple[str, str]) -> float:
        self.failures[key] = self.failures.get(key, 0) + 1
        return failure_backoff(self.failures[key])

    def _failed(self, stack: StackObject, status: StackStatus, errors: list[ActionError]) -> None:
        """Records failed actions in the status about to be written (and posts the Warning first)."""
        reason = "InvalidSpec" if any(e.invalid for e in errors) else "ReconcileError"
        message = "; ".join(f"{e.what}: {e.message}" for e in errors)[:MAX_MESSAGE]
        if not degraded_with(stack.view.status, reason, message):
            self.post_event(stack.raw, reason, message, "Warning")
        now = datetime.now(UTC)
        reconcile_failed(status, stack.view, reason, message, now, stack.view.status.observed_generation)

    def _report(self, stack: StackObject, error: ActionError) -> None:
        """A reconcile that failed before acting: the failure is still visible in status and events."""
        try:
            status = stack.view.status.model_copy(deep=True)
            self._failed(stack, status, [error])
            self.write_status(stack, status)
        except Exception as err:  # the API server itself is failing: the log is all that is left
            log.warning("could not report the failure of %s: %s", stack.view.name, _one_line(err))

    def write_status(self, stack: StackObject, status: StackStatus) -> None:
        """Replaces the status, guarded by the resourceVersion this reconcile read (or last wrote): a stack
        changed since (a spec edit, an annotation, another writer's status) is a Conflict, and the reconcile
        starts again from a fresh read instead of writing a status decided on stale input."""
        body = status_body(status)
        if body != (stack.raw.get("status") or {}):
            view = stack.view
            written = self._guarded_patch(stack, [{"op": "add", "path": "/status", "value": body}], "status")
            stack.raw["status"] = body
            stack.raw["metadata"]["resourceVersion"] = written["metadata"]["resourceVersion"]
            log.debug("%s/%s: status written", view.namespace, view.name)

    def _guarded_patch(self, stack: StackObject, ops: list[dict[str, Any]], subresource: str = "") -> Any:
        """A JSON patch that applies only if the stack's resourceVersion is still the one in `stack.raw`."""
        view = stack.view
        version = stack.raw["metadata"]["resourceVersion"]
        patch = [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, *ops]
        try:
            return kube.patch(self.api, KIND, view.namespace, view.name, patch, subresource)
        except ApiException as err:
            if err.status in (409, 422):
                what = "status" if subresource else "metadata"
                raise Conflict(f"{view.namespace}/{view.name} changed since it was read; {what} not written") from err
            raise

    # --- writing ---------------------------------------------------------------------------------------------

    def execute(self, stack: StackObject, decided: Plan) -> list[ActionError]:
        """Acts on the plan; returns the actions the API refused (every other action is still taken).
        Order: events, the intent (a new cycle) in status before its Jobs, children, Jobs, deletions;
        the outcome status is written last by the caller."""
        view = stack.view
        ns, name = view.namespace, view.name
        if view.deleting:
            for event in decided.events:
                self.post_event(stack.raw, event.reason, event.message, event.type)
        if decided.purge_artifacts and view.spec is not None:
            wait = self._purge(stack, view.spec)
            if wait is not None:
                decided.remove_finalizer = False
                decided.requeue(wait)
        if decided.add_finalizer or decided.remove_finalizer:
            patched = self._guarded_patch(stack, finalizer_patch(view.finalizers, decided.add_finalizer))
            if patched is not None:
                stack.raw["metadata"]["resourceVersion"] = patched["metadata"]["resourceVersion"]
        if view.deleting:
            return []
        for event in decided.events:
            self.post_event(stack.raw, event.reason, event.message, event.type)
        if decided.claim_storage and view.spec is not None:
            store = self.store_for(ns, view.spec)
            store.ensure_bucket(view.spec.storage.artifacts_bucket)
            owner = json.dumps({"uid": view.uid, "namespace": ns, "stack": name}).encode()
            store.put_bytes(view.spec.storage.artifacts_bucket, owner_key(ns, name), owner)
        if decided.create:
            intent = decided.status.model_copy(deep=True)
            intent.observed_generation = view.status.observed_generation
            self.write_status(stack, intent)
        if decided.status.cycles_started > view.status.cycles_started and decided.status.cycle is not None:
            metrics.CYCLES_STARTED.labels(decided.status.cycle.trigger).inc()
        errors: list[ActionError] = []
        for obj in decided.apply:
            _attempt(errors, f"{obj['kind']} {obj['metadata']['name']}", kube.apply, self.api, obj)
        for kind, role in decided.delete_obsolete:
            child = names.cronjob_name(name) if kind == "CronJob" else names.child_name(name, role)
            _attempt(errors, f"{kind} {child}", kube.delete, self.api, kind, ns, child)
        for obj in decided.create:
            created = _attempt(errors, f"{obj['kind']} {obj['metadata']['name']}", kube.create, self.api, obj)
            if created and obj["kind"] in ("Job", "SparkApplication"):
                metrics.JOBS_CREATED.labels(obj["metadata"]["labels"][names.LABEL_STAGE]).inc()
                log.info("%s/%s: created %s %s", ns, name, obj["kind"], obj["metadata"]["name"])
        for kind, child in decided.delete:
            _attempt(errors, f"{kind} {child}", kube.delete, self.api, kind, ns, child)
        if decided.prune_versions:
            board = names.active_versions_configmap(name)
            removal = {"data": dict.fromkeys(decided.prune_versions)}  # merge patch: null removes, absent is fine
            _attempt(errors, f"ConfigMap {board}", kube.patch, self.api, "ConfigMap", ns, board, removal)
        for trigger, result in decided.cycles_finished:
            metrics.CYCLES.labels(trigger, result).inc()
        for finished in decided.stages_finished:
            metrics.STAGE_SECONDS.labels(finished.stage, finished.result).observe(finished.seconds)
        return errors

    def _purge(self, stack: StackObject, spec: LatentMASStackSpec) -> float | None:
        """Deletes the stack's artifacts off the reconcile worker. None when the finalizer may go: purged,
        or nothing can ever purge them (the credentials are gone, e.g. with their namespace); else the
        seconds until the next try. A failure is a Warning event and a retry with backoff, until the plan
        gives up after `purge_timeout_seconds`."""
        view = stack.view
        key, prefix = (view.namespace, view.name), f"{view.namespace}/{view.name}/"
        where = f"{spec.storage.artifacts_bucket}/{prefix}"

        def purge() -> int:
            return delete_prefix(self.store_for(view.namespace, spec), spec.storage.artifacts_bucket, prefix)

        try:
            removed = self.purges.run(key, purge)
        except CredentialsMissing as err:
            message = f"artifacts under {where} not deleted: {err}; finalizer removed"
            self.post_event(stack.raw, "PurgeAbandoned", message, "Warning")
            return None
        except Pending:
            return self.settings.poll_seconds  # the purge's end wakes the stack sooner
        except StoreError as err:
            self.purge_failures[key] = self.purge_failures.get(key, 0) + 1
            self.post_event(stack.raw, "PurgeFailed", f"artifacts under {where} not deleted yet: {err}", "Warning")
            return failure_backoff(self.purge_failures[key])
        self.purge_failures.pop(key, None)
        log.info("deleted %d artifacts of %s/%s (artifactPolicy Delete)", removed, *key)
        return None

    def post_event(self, raw: dict[str, Any], reason: str, message: str, kind: str) -> None:
        meta = raw["metadata"]
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message[:1000],
            "type": kind,
            "source": {"component": names.OPERATOR_NAME},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            kube.request(self.api, "POST", kube.path("Event", meta["namespace"]), body)
        except ApiException as err:
            log.warning("could not post event %s: %s", reason, err.reason)


class CredentialsMissing(StoreError):
    """The stack's credentials Secret (or a key of it) does not exist."""


class Conflict(Exception):
    """The stack changed between read and write: reconcile again from a fresh read (not a failure)."""


def finalizer_patch(current: tuple[str, ...], add: bool) -> list[dict[str, Any]]:
    """The JSON patch ops of `metadata.finalizers`; `Reconciler._guarded_patch` adds the resourceVersion test, so
    a finalizer another controller added concurrently is never dropped (the patch fails instead, and is redone)."""
    finalizers = [f for f in current if f != names.FINALIZER] + ([names.FINALIZER] if add else [])
    return [{"op": "add", "path": "/metadata/finalizers", "value": finalizers}]


@dataclass(frozen=True)
class ActionError:
    """One refused action: what it was, the HTTP status, and the API's own message."""

    what: str
    status: int | None
    message: str

    @property
    def invalid(self) -> bool:
        """The API refused the object itself (a spec value it cannot use), not a transient failure."""
        return self.status in (400, 422)


def _status_code(err: Exception) -> int | None:
    return err.status if isinstance(err, ApiException) else None


def _one_line(err: Exception) -> str:
    """The API's own message when there is one (JSON body), else the exception's first line."""
    if isinstance(err, ApiException) and err.body:
        try:
            message = json.loads(err.body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return str(message).splitlines()[0]
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text


def _attempt(errors: list[ActionError], what: str, action: Callable[..., Any], *args: Any) -> Any:
    """Runs one API action; a refusal is recorded so that the stack's other actions still happen."""
    try:
        return action(*args)
    except ApiException as err:
        errors.append(ActionError(what, err.status, _one_line(err)))
        return None


def _http_client(connect: float, read: float) -> Any:
    """Short timeouts and at most one retry (none after a read timeout) for the operator's S3 calls; stage
    pods keep the SDK defaults."""
    import urllib3

    timeout = urllib3.Timeout(connect=connect, read=read)
    retries = urllib3.Retry(total=1, read=0, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504])
    return urllib3.PoolManager(timeout=timeout, retries=retries, maxsize=4)


def _raw_objects(store: ObjectStore, spec: LatentMASStackSpec) -> int | None:
    """0 when the raw prefix holds no object, 1 when it holds some; None when the bucket is missing (the
    clean stage then fails with its own one-line error)."""
    bucket = spec.storage.raw_bucket
    if not store.bucket_exists(bucket):
        return None
    return 0 if next(iter(store.list(bucket, spec.pipeline.cleaning.raw_prefix)), None) is None else 1


def _timestamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _b64(value: str) -> str:
    import base64

    return base64.b64decode(value).decode()
