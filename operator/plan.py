"""The reconcile decision (DESIGN §5): spec + status + observed children -> new status and the actions
that move the cluster toward it. Pure: no I/O, the clock comes in through `Observed.now`.

Idempotent by construction: the Job of an attempt has a deterministic name, attempts are counted from
the Jobs that exist (not from status), and a cycle is recorded in status before its first Job exists,
so re-running this after any crash creates nothing twice."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from latentmas.cycle import StageRun, cycle_runs, runnable, upstream
from latentmas.operator import names
from latentmas.operator.children import SPARK_DRIVER_ROLE, StackRef, desired_children, endpoint, obsolete_kinds
from latentmas.operator.cron import next_fire
from latentmas.operator.observed import Observed, RunObservation, StackInput
from latentmas.operator.stagejobs import cycle_configmap, stage_object
from latentmas.recipe import recipe_hash
from latentmas.spec import (
    AdapterStatus,
    BuiltRun,
    Condition,
    CycleStatus,
    LatentMASStackSpec,
    PendingTrigger,
    StackStatus,
    StageRunStatus,
    TriggerSource,
)
from latentmas.training.distributed import rendezvous_service

MANIFEST_GRACE_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 3600.0
HANDLED_TRIGGERS_KEPT = 20
ARTIFACT_SECTIONS = ("baseModel", "experts", "pipeline", "evaluation")
UID_CHARS = 8
NO_NEW_DATA = "NoNewData"
FAILURE_BACKOFF_SECONDS = 2.0
MAX_FAILURE_BACKOFF_SECONDS = 300.0


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    type: str = "Normal"


@dataclass(frozen=True)
class StageFinished:
    """A stage attempt that ended in this reconcile (for the stage-duration metric)."""

    stage: str
    result: str
    seconds: float


@dataclass
class Plan:
    status: StackStatus
    apply: list[dict[str, Any]] = field(default_factory=list)
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)
    delete_obsolete: list[tuple[str, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    claim_storage: bool = False
    prune_versions: list[str] = field(default_factory=list)
    add_finalizer: bool = False
    remove_finalizer: bool = False
    purge_artifacts: bool = False
    requeue_after: float | None = None
    cycles_finished: list[tuple[str, str]] = field(default_factory=list)
    stages_finished: list[StageFinished] = field(default_factory=list)

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass(frozen=True)
class Settings:
    """Operator-level knobs (command-line flags), not part of any stack."""

    trigger_image: str = "ghcr.io/latentmas/latentmas-operator:0.1.0"
    poll_seconds: float = 10.0
    resync_seconds: float = 60.0
    manifest_grace_seconds: float = MANIFEST_GRACE_SECONDS
    spark_driver_role: str = SPARK_DRIVER_ROLE  # the static ClusterRole a Spark driver's account is bound to
    store_connect_timeout: float = 3.0  # the operator's own S3 calls: short, and off the reconcile workers
    store_read_timeout: float = 5.0
    store_wait_seconds: float = 1.0  # how long a reconcile waits for its stack's storage call
    purge_timeout_seconds: float = 600.0  # artifact purge on deletion gives up (Warning) after this


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def spec_hash(spec: LatentMASStackSpec) -> str:
    """The older release's artifact hash (whole sections), kept in status so earlier readers and
    stacks built by them are understood; triggers compare `recipe_hash` instead."""
    dumped = spec.model_dump(mode="json", by_alias=True)
    return names.stable_hash({k: dumped[k] for k in ARTIFACT_SECTIONS})


def built_recipe(status: StackStatus, spec: LatentMASStackSpec) -> str | None:
    """The recipe hash of the last successful cycle's artifacts. A status written by the older release
    has only `artifactsSpecHash`: equal to the current spec's older hash means built from this recipe."""
    if status.artifacts_recipe_hash is not None or status.artifacts_spec_hash is None:
        return status.artifacts_recipe_hash
    return recipe_hash(spec) if status.artifacts_spec_hash == spec_hash(spec) else f"old-{status.artifacts_spec_hash}"


def cycle_recipe(cycle: CycleStatus, spec: LatentMASStackSpec) -> str:
    """The recipe a cycle builds (read from the older form as in `built_recipe`)."""
    if cycle.recipe_hash is not None:
        return cycle.recipe_hash
    return recipe_hash(spec) if cycle.spec_hash == spec_hash(spec) else f"old-{cycle.spec_hash}"


def cycle_id(number: int, uid: str) -> str:
    """`c<n>-<uid prefix>`: unique per stack instance, so a re-created stack with the same name never
    finds (and reuses) the artifacts of the old one. Cycles named `c<n>` by the older release keep
    their paths."""
    return f"c{number}-{uid.replace('-', '')[:UID_CHARS].lower()}"


def plan(stack: StackInput, observed: Observed, settings: Settings) -> Plan:
    status = stack.status.model_copy(deep=True)
    result = Plan(status=status)
    ref = StackRef(stack.name, stack.namespace, stack.uid)
    if stack.deleting:
        _finalize(stack, observed.now, settings, result)
        return result
    status.observed_generation = stack.generation  # only written when every action succeeded
    if stack.spec is None:
        status.phase = "Degraded"
        _set_condition(
            status, "Degraded", "True", "InvalidSpec", stack.spec_error or "invalid spec", observed.now, stack
        )
        _set_condition(status, "Ready", "False", "InvalidSpec", "the spec does not validate", observed.now, stack)
        return result
    spec = stack.spec
    if stack.status_error:
        message = f"status could not be read ({stack.status_error}); continuing from cycle {status.cycles_started}"
        result.events.append(Event("StatusUnreadable", message, "Warning"))
    _storage_owner(stack, spec, observed, result)
    _finalizer(stack, spec, result)
    _children(ref, spec, settings, result)
    _triggers(stack, spec, observed, result)
    if status.cycle is not None:
        _advance(ref, spec, observed, settings, result)
    if status.cycle is None and status.pending_triggers:
        result.requeue(0.0)
    _adapters(spec, observed, status)
    invalid = _schedule(spec, observed, status)
    status.endpoint = endpoint(ref, spec) if spec.inference.enabled else None
    _phase(stack, spec, observed, result)
    if invalid is not None:
        if not degraded_with(stack.status, "InvalidSpec", invalid):
            result.events.append(Event("InvalidSpec", invalid, "Warning"))
        reconcile_failed(status, stack, "InvalidSpec", invalid, observed.now, stack.status.observed_generation)
    _cleanup(stack.name, observed, status, result)
    result.requeue(settings.poll_seconds if status.cycle is not None else settings.resync_seconds)
    return result


def _finalize(stack: StackInput, now: datetime, settings: Settings, result: Plan) -> None:
    """Purge (artifactPolicy Delete), then drop the finalizer. Bounded: after `purge_timeout_seconds` the
    purge is given up with a Warning, so a stack never blocks its own (or its namespace's) deletion."""
    if names.FINALIZER not in stack.finalizers:
        return
    result.remove_finalizer = True
    spec = stack.spec
    if spec is None or spec.storage.artifact_policy != "Delete":
        return
    waited = (now - stack.deleted_at).total_seconds() if stack.deleted_at is not None else 0.0
    if waited < settings.purge_timeout_seconds:
        result.purge_artifacts = True
        return
    where = f"{spec.storage.artifacts_bucket}/{stack.namespace}/{stack.name}/"
    message = f"artifacts under {where} not deleted within {settings.purge_timeout_seconds:.0f} s; finalizer removed"
    result.events.append(Event("PurgeAbandoned", message, "Warning"))


def _storage_owner(stack: StackInput, spec: LatentMASStackSpec, observed: Observed, result: Plan) -> None:
    """Stack-level artifacts (registry.json, splits, caches) of a stack re-created with the same name are
    adopted: its promoted versions keep serving, while cycles (keyed by uid) never reuse old stages."""
    if result.status.storage_uid == stack.uid or not observed.storage_owner_read:
        return
    previous = observed.storage_owner
    if previous is not None and previous != stack.uid:
        where = f"{spec.storage.artifacts_bucket}/{stack.namespace}/{stack.name}/"
        message = f"artifacts at {where} belonged to stack uid {previous}; adopted (cycles are per uid, none reused)"
        result.events.append(Event("ArtifactsAdopted", message, "Warning"))
    result.claim_storage = True
    result.status.storage_uid = stack.uid


def _finalizer(stack: StackInput, spec: LatentMASStackSpec, result: Plan) -> None:
    wanted = spec.storage.artifact_policy == "Delete"
    present = names.FINALIZER in stack.finalizers
    result.add_finalizer = wanted and not present
    result.remove_finalizer = present and not wanted


def _children(ref: StackRef, spec: LatentMASStackSpec, settings: Settings, result: Plan) -> None:
    """Level-triggered: every desired child is server-side applied on every reconcile, so a deleted,
    edited or scaled child is restored and an apply refused once is retried."""
    children = desired_children(ref, spec, settings.trigger_image, settings.spark_driver_role)
    result.apply = children
    result.delete_obsolete = obsolete_kinds(spec)
    result.status.children_hash = names.stable_hash(children)


# --- triggers and cycle start ---------------------------------------------------------------------------------


def _candidates(stack: StackInput, spec: LatentMASStackSpec, observed: Observed) -> list[PendingTrigger]:
    status = stack.status
    found: list[PendingTrigger] = []
    nonce = stack.annotations.get(names.ANNOTATION_EVOLVE)
    if nonce and nonce != status.annotation_nonce:
        # `latentmas trigger --source schedule` marks its own nonce; a later plain `kubectl annotate` is not.
        scheduled = stack.annotations.get(names.ANNOTATION_EVOLVE_SOURCE) == f"schedule:{nonce}"
        found.append(PendingTrigger(nonce=nonce, source="schedule" if scheduled else "annotation"))
    if spec.schedule is not None and observed.trigger_jobs:
        latest = max(observed.trigger_jobs, key=lambda j: (j.created_at, j.name))
        found.append(PendingTrigger(nonce=latest.name, source="schedule"))
    # Level-triggered on what is built, not on a history of hashes: retrain whenever the built artifacts'
    # recipe differs from the current one and no running cycle builds it. The nonce carries the generation,
    # so a recipe that comes back (A -> B -> A -> B) triggers again, and a failed one is not retried in a loop.
    current = recipe_hash(spec)
    built = built_recipe(status, spec)
    running = cycle_recipe(status.cycle, spec) if status.cycle else None
    if built is not None and current not in (built, running):
        found.append(PendingTrigger(nonce=f"spec-{current}-g{stack.generation}", source="spec"))
    return found


def _seen(status: StackStatus) -> set[str]:
    seen = set(status.handled_triggers) | {p.nonce for p in status.pending_triggers}
    if status.cycle is not None:
        seen.add(status.cycle.nonce)
    return seen


def _handled(status: StackStatus, nonce: str) -> None:
    status.handled_triggers = [*[n for n in status.handled_triggers if n != nonce], nonce][-HANDLED_TRIGGERS_KEPT:]


def _triggers(stack: StackInput, spec: LatentMASStackSpec, observed: Observed, result: Plan) -> None:
    status = result.status
    annotation = stack.annotations.get(names.ANNOTATION_EVOLVE)
    if annotation:
        status.annotation_nonce = annotation
    for trigger in _candidates(stack, spec, observed):
        if trigger.nonce in _seen(status):
            continue
        if status.cycle is None:
            status.pending_triggers.append(trigger)
            continue
        policy = spec.schedule.concurrency_policy if spec.schedule else "Allow"
        if trigger.source == "schedule" and policy == "Forbid":
            _handled(status, trigger.nonce)
            result.events.append(Event("ScheduleSkipped", f"cycle {status.cycle.id} still running (Forbid)"))
        elif trigger.source == "schedule" and policy == "Replace":
            _cancel(observed, result, f"replaced by scheduled run {trigger.nonce}")
            status.pending_triggers.insert(0, trigger)
        else:
            status.pending_triggers.append(trigger)
    if status.cycle is None and status.pending_triggers:
        trigger = status.pending_triggers.pop(0)
        _start(stack.uid, spec, trigger, observed.now, result)


def reusable_runs(spec: LatentMASStackSpec, built: dict[str, BuiltRun]) -> dict[str, str]:
    """Run id -> cycle holding artifacts a new cycle can reuse: the run's own recipe slice is unchanged and
    every run it reads from is reused as well (a re-run upstream changes its inputs)."""
    reuse: dict[str, str] = {}
    for run in cycle_runs(spec):  # dependency order
        prior = built.get(run.id)
        if prior is None or prior.recipe_hash != recipe_hash(spec, run.stage, run.expert):
            continue
        if all(u.id in reuse for u in upstream(run, spec)):
            reuse[run.id] = prior.cycle
    return reuse


def _start(uid: str, spec: LatentMASStackSpec, trigger: PendingTrigger, now: datetime, result: Plan) -> None:
    """Records a new cycle. A recipe change (spec trigger) re-runs only the runs whose recipe slice or
    inputs changed; the others are Succeeded at once, reusing the cycle that built them. New data
    (annotation, schedule) re-runs everything."""
    status = result.status
    status.cycles_started += 1
    new_id = cycle_id(status.cycles_started, uid)
    reuse = reusable_runs(spec, status.built_runs) if trigger.source == "spec" else {}
    stages = {}
    for run in cycle_runs(spec):
        record = StageRunStatus(recipe_hash=recipe_hash(spec, run.stage, run.expert), reused_from=reuse.get(run.id))
        if record.reused_from is not None:
            record.state, record.message = "Succeeded", f"reused from cycle {record.reused_from} (recipe unchanged)"
            record.started_at = record.finished_at = iso(now)
        stages[run.id] = record
    status.cycle = CycleStatus(
        id=new_id,
        trigger=trigger.source,
        nonce=trigger.nonce,
        spec_hash=spec_hash(spec),
        recipe_hash=recipe_hash(spec),
        started_at=iso(now),
        stages=stages,
    )
    _handled(status, trigger.nonce)
    reused = f"; reusing {len(reuse)} of {len(stages)} runs" if reuse else ""
    message = f"cycle {new_id} started by {trigger.source} ({trigger.nonce}){reused}"
    result.events.append(Event("CycleStarted", message))


def _cancel(observed: Observed, result: Plan, reason: str) -> None:
    cycle = result.status.cycle
    assert cycle is not None
    for run in observed.runs:
        if run.cycle == cycle.id and run.state == "active":
            result.delete.append((run.kind, run.name))
    for stage in cycle.stages.values():
        if stage.state not in ("Succeeded", "Failed"):
            stage.state = "Cancelled"
    _finish(result, "Cancelled", reason, observed.now, trigger_source=cycle.trigger)


def _finish(
    result: Plan, state: str, message: str, now: datetime, trigger_source: TriggerSource, reason: str | None = None
) -> None:
    status = result.status
    cycle = status.cycle
    assert cycle is not None
    cycle.state = state  # type: ignore[assignment]
    cycle.finished_at = iso(now)
    cycle.message = message
    cycle.reason = reason
    if state == "Succeeded" and reason != NO_NEW_DATA:
        status.artifacts_spec_hash = cycle.spec_hash
        status.artifacts_recipe_hash = cycle.recipe_hash
        status.artifacts_raw_digest = cycle.raw_digest
        status.built_runs = {
            run_id: BuiltRun(cycle=record.reused_from or cycle.id, recipe_hash=record.recipe_hash)
            for run_id, record in cycle.stages.items()
            if record.recipe_hash is not None
        }
    status.last_cycle, status.cycle = cycle, None
    result.cycles_finished.append((trigger_source, state))
    kind = "Normal" if state == "Succeeded" else "Warning"
    result.events.append(Event(f"Cycle{state}", f"cycle {cycle.id}: {message}", kind))


# --- advancing the running cycle ------------------------------------------------------------------------------


def _backoff(spec: LatentMASStackSpec, stage: str, attempt: int) -> float:
    base = spec.retry_for(stage).backoff_seconds
    return float(min(base * 2 ** max(attempt - 1, 0), MAX_BACKOFF_SECONDS))


def _launch(
    ref: StackRef, spec: LatentMASStackSpec, observed: Observed, run: StageRun, attempt: int, result: Plan
) -> None:
    cycle = result.status.cycle
    assert cycle is not None
    obj = stage_object(ref, spec, cycle.id, run, attempt, observed.spark_operator)
    service = rendezvous_service(obj, spec.pipeline.training) if run.stage == "train" else None
    result.create.extend([service, obj] if service else [obj])  # multi-node training meets through it
    record = cycle.stages[run.id]
    record.state, record.attempts, record.job_name = "Running", attempt, obj["metadata"]["name"]
    record.kind = "SparkApplication" if obj["kind"] == "SparkApplication" else "Job"
    record.message = None
    if attempt == 1:
        record.started_at = iso(observed.now)


def _advance(ref: StackRef, spec: LatentMASStackSpec, observed: Observed, settings: Settings, result: Plan) -> None:
    cycle = result.status.cycle
    assert cycle is not None
    if cycle.id not in observed.config_cycles:
        inputs = {run_id: r.reused_from for run_id, r in cycle.stages.items() if r.reused_from is not None}
        result.create.append(cycle_configmap(ref, spec, cycle.id, cycle_runs(spec), inputs))
    attempts: dict[str, list[RunObservation]] = {}
    for run_obs in observed.runs:
        if run_obs.cycle == cycle.id:
            attempts.setdefault(run_obs.run_id, []).append(run_obs)
    done: set[StageRun] = set()
    started: set[StageRun] = set()
    retry_now: list[tuple[StageRun, int]] = []
    failure: str | None = None
    for run in cycle_runs(spec):
        record = cycle.stages.setdefault(run.id, StageRunStatus())
        tried = sorted(attempts.get(run.id, []), key=lambda r: r.attempt)
        if run.id in observed.manifests or record.state == "Succeeded":
            _succeeded(run, record, tried, observed, result)
            done.add(run)
            continue
        if not tried:
            continue
        started.add(run)
        last = tried[-1]
        record.attempts, record.job_name, record.kind = last.attempt, last.name, last.kind
        record.started_at = record.started_at or (iso(tried[0].started_at) if tried[0].started_at else None)
        if run.id in observed.progress:
            record.progress = observed.progress[run.id]
        message = _attempt_failure(last, observed, settings, run, spec, result)
        if message is None:
            continue
        retries = spec.retry_for(run.stage).retries
        if last.attempt > retries:
            record.state, record.message = "Failed", f"{message} (attempt {last.attempt}/{retries + 1})"
            record.finished_at = iso(last.finished_at or observed.now)
            failure = failure or f"stage {run.id} failed after {last.attempt} attempts: {message}"
            continue
        wait_until = (last.finished_at or observed.now) + timedelta(seconds=_backoff(spec, run.stage, last.attempt))
        if observed.now >= wait_until:
            retry_now.append((run, last.attempt + 1))
        else:
            record.state, record.message = "BackingOff", f"attempt {last.attempt} failed: {message}"
            result.requeue((wait_until - observed.now).total_seconds())
    if failure is None and _no_new_data(spec, observed, started, result):
        return
    if failure is not None:
        for run_obs in observed.runs:
            if run_obs.cycle == cycle.id and run_obs.state == "active":
                result.delete.append((run_obs.kind, run_obs.name))
        for record in cycle.stages.values():
            if record.state in ("Pending", "Running", "Verifying", "BackingOff"):
                record.state = "Cancelled"
        _finish(result, "Failed", failure, observed.now, cycle.trigger)
        return
    for run, attempt in retry_now:
        result.events.append(Event("StageRetry", f"stage {run.id}: attempt {attempt}", "Warning"))
        _launch(ref, spec, observed, run, attempt, result)
    for run in runnable(spec, done, started):
        _launch(ref, spec, observed, run, 1, result)
    if len(done) == len(cycle_runs(spec)):
        _finish(result, "Succeeded", "all stages succeeded", observed.now, cycle.trigger)


def _no_new_data(spec: LatentMASStackSpec, observed: Observed, started: set[StageRun], result: Plan) -> bool:
    """Ends a cycle as Succeeded/NoNewData when its raw data is empty (before cleaning) or equals what the
    last successful cycle built from (after cleaning, before anything else starts). A spec-triggered
    cycle, or one whose recipe differs from the built artifacts', always runs."""
    status = result.status
    cycle = status.cycle
    assert cycle is not None
    if cycle.trigger == "spec":
        return False
    clean = cycle.stages["clean"]
    if observed.raw_objects == 0 and StageRun("clean") not in started and clean.state != "Succeeded":
        prefix = spec.pipeline.cleaning.raw_prefix
        message = f"no new data: no raw objects under {spec.storage.raw_bucket}/{prefix}"
    elif (
        clean.state == "Succeeded"
        and cycle.raw_digest is not None
        and cycle.raw_digest == status.artifacts_raw_digest
        and cycle_recipe(cycle, spec) == built_recipe(status, spec)
        and not any(r.cycle == cycle.id and r.run_id != "clean" for r in observed.runs)
    ):
        message = "no new data: the raw listing equals the last successful cycle's"
    else:
        return False
    result.create.clear()
    for record in cycle.stages.values():
        if record.state == "Pending":
            record.state, record.message = "Cancelled", NO_NEW_DATA
    _finish(result, "Succeeded", message, observed.now, cycle.trigger, NO_NEW_DATA)
    return True


def _succeeded(
    run: StageRun, record: StageRunStatus, tried: list[RunObservation], observed: Observed, result: Plan
) -> None:
    if record.state == "Succeeded":
        return
    last = tried[-1] if tried else None
    finished = last.finished_at if last and last.finished_at else observed.now
    record.state, record.message, record.progress = "Succeeded", observed.summaries.get(run.id), None
    record.finished_at = iso(finished)
    cycle = result.status.cycle
    if run.stage == "clean" and cycle is not None and observed.clean_digest is not None:
        cycle.raw_digest = observed.clean_digest
    if last is not None:
        record.attempts, record.job_name, record.kind = last.attempt, last.name, last.kind
        started = tried[0].started_at
        seconds = (finished - started).total_seconds() if started else 0.0
        result.stages_finished.append(StageFinished(run.stage, "succeeded", seconds))


def _attempt_failure(
    last: RunObservation, observed: Observed, settings: Settings, run: StageRun, spec: LatentMASStackSpec, result: Plan
) -> str | None:
    """None while the attempt is running or verifying; the failure reason once it has failed."""
    cycle = result.status.cycle
    assert cycle is not None
    record = cycle.stages[run.id]
    if last.state == "active":
        record.state = "Running"
        return None
    if last.state == "succeeded":
        if observed.store_error:
            record.state, record.message = "Verifying", f"cannot check the manifest: {observed.store_error}"
            result.requeue(settings.poll_seconds)
            return None
        finished = last.finished_at or observed.now
        if (observed.now - finished).total_seconds() < settings.manifest_grace_seconds:
            record.state, record.message = "Verifying", "Job succeeded; waiting for its _manifest.json"
            result.requeue(min(settings.poll_seconds, 2.0))
            return None
        message = f"Job {last.name} succeeded but wrote no _manifest.json"
    else:
        message = last.message or f"Job {last.name} failed"
    if record.state not in ("BackingOff", "Failed"):
        started = last.started_at or last.finished_at or observed.now
        seconds = ((last.finished_at or observed.now) - started).total_seconds()
        result.stages_finished.append(StageFinished(run.stage, "failed", seconds))
    return message


# --- status: adapters, schedule, phase, conditions ------------------------------------------------------------


def _adapters(spec: LatentMASStackSpec, observed: Observed, status: StackStatus) -> None:
    registry = observed.registry
    if registry is None:
        return
    entries: list[tuple[str, Literal["expert", "router", "index"], int | None]] = [
        (e.name, "expert", registry.experts[e.name].current if e.name in registry.experts else None)
        for e in spec.experts
    ]
    entries += [("router", "router", registry.router.current), ("index", "index", registry.index.current)]
    adapters = []
    for name, kind, target in entries:
        served = [pod.get(name) for pod in observed.pod_versions]
        active = served[0] if served and all(v == served[0] for v in served) else None
        updated = sum(1 for v in served if target is not None and v == target)
        adapters.append(AdapterStatus(name=name, kind=kind, target=target, active=active, pods_updated=updated))
    status.adapters = adapters
    experts = [a for a in adapters if a.kind == "expert"]
    ready = sum(1 for a in experts if a.target is not None and (a.active == a.target or not spec.inference.enabled))
    status.experts_ready = f"{ready}/{len(experts)}"


def _schedule(spec: LatentMASStackSpec, observed: Observed, status: StackStatus) -> str | None:
    """Last/next fire time; a one-line reason when the schedule cannot be used."""
    schedule = spec.schedule
    if schedule is None:
        status.last_schedule = status.next_schedule = None
        return None
    if observed.last_schedule is not None:
        status.last_schedule = iso(observed.last_schedule)
    try:
        fire = None if schedule.suspend else next_fire(schedule.cron, observed.now, schedule.time_zone)
    except (ValueError, KeyError) as err:  # ZoneInfoNotFoundError is a KeyError
        status.next_schedule = None
        return f"spec.schedule: {str(err).strip(chr(39))}"
    status.next_schedule = None if fire is None else iso(fire)
    return None


def _set_condition(
    status: StackStatus, kind: str, value: str, reason: str, message: str, now: datetime, stack: StackInput
) -> None:
    for condition in status.conditions:
        if condition.type == kind:
            if condition.status != value:
                condition.last_transition_time = iso(now)
            condition.status, condition.reason, condition.message = value, reason, message  # type: ignore[assignment]
            condition.observed_generation = stack.generation
            return
    status.conditions.append(
        Condition(
            type=kind,
            status=value,
            reason=reason,
            message=message,
            last_transition_time=iso(now),
            observed_generation=stack.generation,
        )
    )


def _adapters_synced(spec: LatentMASStackSpec, observed: Observed, result: Plan, stack: StackInput) -> bool:
    """`AdaptersSynced`: every ready inference pod serves every promoted target and reports no reload
    error (the pods' own messages say why not)."""
    status, now = result.status, observed.now
    result.prune_versions = list(observed.stale_version_entries)
    if not spec.inference.enabled:
        _set_condition(status, "AdaptersSynced", "True", "InferenceDisabled", "", now, stack)
        return True
    behind = [
        f"{a.name} {a.active}/{a.target}" for a in status.adapters if a.target is not None and a.active != a.target
    ]
    errors = [f"{name}: {error}" for name, error in sorted(observed.reload_errors.items())]
    if errors:
        message = "reload failed: " + "; ".join(errors) + (f" (active/target: {', '.join(behind)})" if behind else "")
        _set_condition(status, "AdaptersSynced", "False", "ReloadFailed", message[:900], now, stack)
        return False
    if behind:
        message = f"active/target: {', '.join(behind)}"
        _set_condition(status, "AdaptersSynced", "False", "NotSynced", message[:900], now, stack)
        return False
    _set_condition(status, "AdaptersSynced", "True", "Synced", "every promoted version is served", now, stack)
    return True


def _phase(stack: StackInput, spec: LatentMASStackSpec, observed: Observed, result: Plan) -> None:
    status, now = result.status, observed.now
    before = stack.status.phase
    wanted = spec.inference.replicas if observed.desired_replicas is None else observed.desired_replicas
    serving = not spec.inference.enabled or (
        observed.deployment_exists and wanted > 0 and observed.ready_replicas >= wanted and observed.rollout is None
    )
    status.inference_ready_replicas = observed.ready_replicas
    promoted = bool(status.adapters) and all(a.target is not None for a in status.adapters if a.kind == "expert")
    synced = _adapters_synced(spec, observed, result, stack)
    last = status.last_cycle
    failed = last is not None and last.state == "Failed" and status.cycle is None
    if serving and promoted and synced:
        message = "inference has finished its rollout and serves every promoted version"
        _set_condition(status, "Ready", "True", "Serving", message, now, stack)
    elif not serving:
        message = f"inference has {observed.ready_replicas}/{wanted} ready replicas"
        if observed.rollout is not None:
            message += f"; {observed.rollout}"
        _set_condition(status, "Ready", "False", "InferenceNotReady", message, now, stack)
    elif not promoted:
        _set_condition(status, "Ready", "False", "NotPromoted", "no promoted version of every expert yet", now, stack)
    else:
        message = "inference does not serve every promoted version yet (see AdaptersSynced)"
        _set_condition(status, "Ready", "False", "AdaptersNotSynced", message, now, stack)
    if observed.store_error is not None:
        _set_condition(status, "StorageReachable", "False", "Unreachable", observed.store_error[:900], now, stack)
    else:
        _set_condition(status, "StorageReachable", "True", "Reachable", spec.storage.endpoint, now, stack)
    if status.cycle is not None:
        _set_condition(status, "Progressing", "True", "CycleRunning", f"cycle {status.cycle.id} running", now, stack)
    else:
        _set_condition(status, "Progressing", "False", "Idle", "no cycle running", now, stack)
    if failed and last is not None:
        _set_condition(status, "Degraded", "True", "CycleFailed", last.message or "cycle failed", now, stack)
    else:
        _set_condition(status, "Degraded", "False", "AsExpected", "", now, stack)
    if status.cycle is not None:
        status.phase = "Evolving"
    elif failed:
        status.phase = "Degraded"
    elif serving and promoted and synced:
        status.phase = "Ready"
    else:
        status.phase = "Pending"
    if status.phase != before:
        kind = "Warning" if status.phase == "Degraded" else "Normal"
        result.events.append(Event(f"Phase{status.phase}", f"phase {before} -> {status.phase}", kind))


def reconcile_failed(
    status: StackStatus, stack: StackInput, reason: str, message: str, now: datetime, observed_generation: int
) -> None:
    """What actually happened when acting on a plan failed: Degraded with the API's reason, Ready
    unchanged, and `observedGeneration` left at the last generation fully handled."""
    _set_condition(status, "Degraded", "True", reason, message, now, stack)
    status.phase = "Degraded"
    status.observed_generation = observed_generation


def degraded_with(status: StackStatus, reason: str, message: str) -> bool:
    """Whether `status` already reports this failure (so its Warning event is not posted again)."""
    return any(
        c.type == "Degraded" and c.status == "True" and c.reason == reason and c.message == message
        for c in status.conditions
    )


def failure_backoff(failures: int) -> float:
    """Seconds before retrying a stack whose reconcile failed `failures` times in a row."""
    return float(min(FAILURE_BACKOFF_SECONDS * 2 ** max(failures - 1, 0), MAX_FAILURE_BACKOFF_SECONDS))


def _cleanup(stack: str, observed: Observed, status: StackStatus, result: Plan) -> None:
    """Stage Jobs of cycles before the last one are removed (their results live in object storage), and
    any still-active Job of a cycle that is not running (a crash between ending a cycle and deleting
    its Jobs must not leak GPU Jobs)."""
    keep = {c.id for c in (status.cycle, status.last_cycle) if c is not None}
    running = status.cycle.id if status.cycle is not None else None
    for run in observed.runs:
        leaked = run.state == "active" and run.cycle != running
        if (run.cycle not in keep or leaked) and (run.kind, run.name) not in result.delete:
            result.delete.append((run.kind, run.name))
    for cycle in sorted(observed.config_cycles - keep):
        result.delete.append(("ConfigMap", names.cycle_configmap(stack, cycle)))
