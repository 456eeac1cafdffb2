"""The reconcile decisions as pure functions (spec + status + observed -> actions), no cluster needed:
idempotency, retries with backoff, the schedule's concurrency policies, Spark modes, names, cron."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from latentmas.cycle import StageRun
from latentmas.operator import names
from latentmas.operator.cron import next_fire
from latentmas.operator.observed import Observed, RunObservation, StackInput, TriggerJob
from latentmas.operator.plan import Plan, Settings, plan
from latentmas.operator.stagejobs import spark_mode
from latentmas.spec import LatentMASStackSpec, StackStatus

pytestmark = pytest.mark.operator

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SETTINGS = Settings(poll_seconds=1, resync_seconds=30, manifest_grace_seconds=5)
UID = "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
C1, C2 = "c1-0f1e2d3c", "c2-0f1e2d3c"


def spec(**extra: object) -> LatentMASStackSpec:
    body = {"experts": [{"name": "law", "domain": "law"}], "pipeline": {"retry": {"retries": 1, "backoffSeconds": 10}}}
    return LatentMASStackSpec.model_validate({**body, **extra})


def stack(status: StackStatus, annotation: str | None = "1", the_spec: LatentMASStackSpec | None = None) -> StackInput:
    annotations = {names.ANNOTATION_EVOLVE: annotation} if annotation else {}
    return StackInput("team", "ns", UID, 1, annotations, (), False, the_spec or spec(), None, status)


def jobs_of(decided: Plan) -> list[str]:
    return [o["metadata"]["name"] for o in decided.create if o["kind"] == "Job"]


def run_obs(
    run_id: str, state: str, attempt: int = 1, finished: datetime | None = NOW, cycle: str = C1
) -> RunObservation:
    return RunObservation(f"team-{cycle}-{run_id}-{attempt}", "Job", cycle, run_id, attempt, state, NOW, finished)


def test_annotation_starts_one_cycle_and_replays_create_nothing_new() -> None:
    first = plan(stack(StackStatus()), Observed(now=NOW), SETTINGS)
    assert first.status.cycle is not None and first.status.cycle.id == C1
    assert jobs_of(first) == [f"team-{C1}-clean-1"]
    assert any(o["kind"] == "ConfigMap" for o in first.create)
    # Same inputs again after a crash before anything was written: the same names, nothing else.
    again = plan(stack(StackStatus()), Observed(now=NOW), SETTINGS)
    assert jobs_of(again) == jobs_of(first) and again.status.cycle.id == C1
    # With the status written and the Job observed, the next reconcile creates nothing.
    observed = Observed(now=NOW, runs=[run_obs("clean", "active", finished=None)], config_cycles=frozenset({C1}))
    steady = plan(stack(first.status), observed, SETTINGS)
    assert steady.create == [] and steady.status.cycle.stages["clean"].state == "Running"
    assert steady.status.cycles_started == 1


def test_manifest_advances_dependents_in_graph_order() -> None:
    started = plan(stack(StackStatus()), Observed(now=NOW), SETTINGS).status
    observed = Observed(
        now=NOW, runs=[run_obs("clean", "succeeded")], manifests=frozenset({"clean"}), config_cycles=frozenset({C1})
    )
    decided = plan(stack(started), observed, SETTINGS)
    assert sorted(jobs_of(decided)) == [f"team-{C1}-base-1", f"team-{C1}-index-1", f"team-{C1}-quant-1"]
    assert decided.status.cycle.stages["clean"].state == "Succeeded"


def test_a_finished_stage_shows_its_manifest_summary_as_status_message() -> None:
    """Gate decisions reach `kubectl describe`: a stage's manifest `statusSummary` becomes its message."""
    started = plan(stack(StackStatus()), Observed(now=NOW), SETTINGS).status
    line = "python: promote (+3.1% vs base, CI [+1.2, +5.0]); linux: refused (CI includes 0)"
    observed = Observed(
        now=NOW,
        runs=[run_obs("clean", "succeeded")],
        manifests=frozenset({"clean"}),
        config_cycles=frozenset({C1}),
        summaries={"clean": line},
    )
    record = plan(stack(started), observed, SETTINGS).status.cycle.stages["clean"]
    assert (record.state, record.message) == ("Succeeded", line)


def test_failed_attempt_backs_off_then_retries_then_degrades() -> None:
    started = plan(stack(StackStatus()), Observed(now=NOW), SETTINGS).status
    failed = run_obs("clean", "failed")
    slow_poll = Settings(poll_seconds=30, manifest_grace_seconds=5)
    observed = Observed(now=NOW + timedelta(seconds=4), runs=[failed], config_cycles=frozenset({C1}))
    waiting = plan(stack(started), observed, slow_poll)
    assert waiting.create == [] and waiting.status.cycle.stages["clean"].state == "BackingOff"
    assert waiting.requeue_after == pytest.approx(6.0)
    retry = plan(
        stack(waiting.status),
        Observed(now=NOW + timedelta(seconds=10), runs=[failed], config_cycles=frozenset({C1})),
        SETTINGS,
    )
    assert jobs_of(retry) == [f"team-{C1}-clean-2"]
    second = run_obs("clean", "failed", attempt=2)
    done = plan(stack(retry.status), Observed(now=NOW + timedelta(seconds=20), runs=[failed, second]), SETTINGS)
    assert done.status.cycle is None and done.status.last_cycle.state == "Failed"
    assert done.status.phase == "Degraded"
    assert {c.type: c.status for c in done.status.conditions}["Degraded"] == "True"


def test_succeeded_job_without_manifest_waits_for_the_grace_period() -> None:
    started = plan(stack(StackStatus()), Observed(now=NOW), SETTINGS).status
    job = run_obs("clean", "succeeded")
    verifying = plan(stack(started), Observed(now=NOW + timedelta(seconds=2), runs=[job]), SETTINGS)
    assert verifying.status.cycle.stages["clean"].state == "Verifying"
    late = plan(stack(started), Observed(now=NOW + timedelta(seconds=6), runs=[job]), SETTINGS)
    assert late.status.cycle.stages["clean"].state == "BackingOff"
    assert "wrote no _manifest.json" in (late.status.cycle.stages["clean"].message or "")


@pytest.mark.parametrize(("policy", "expected"), [("Forbid", "skipped"), ("Replace", "replaced"), ("Allow", "queued")])
def test_schedule_during_a_cycle_follows_the_concurrency_policy(policy: str, expected: str) -> None:
    scheduled = spec(schedule={"cron": "*/1 * * * *", "concurrencyPolicy": policy})
    started = plan(stack(StackStatus(), the_spec=scheduled), Observed(now=NOW), SETTINGS).status
    observed = Observed(
        now=NOW, runs=[run_obs("clean", "active", finished=None)], trigger_jobs=[TriggerJob("team-evolve-29000", NOW)]
    )
    decided = plan(stack(started, the_spec=scheduled), observed, SETTINGS)
    status = decided.status
    if expected == "skipped":
        assert status.cycle.id == C1 and "team-evolve-29000" in status.handled_triggers and not status.pending_triggers
    elif expected == "replaced":
        assert status.last_cycle.state == "Cancelled" and status.cycle.id == C2 and status.cycle.trigger == "schedule"
        assert ("Job", f"team-{C1}-clean-1") in decided.delete
    else:
        assert status.cycle.id == C1 and [p.nonce for p in status.pending_triggers] == ["team-evolve-29000"]


def test_spark_cleaning_picks_application_submit_or_local() -> None:
    clean = StageRun("clean")
    assert spark_mode(spec(), clean, True) == "none"
    one = spec(pipeline={"cleaning": {"engine": "spark"}})
    many = spec(pipeline={"cleaning": {"engine": "spark", "sparkExecutors": 4}})
    assert (spark_mode(many, clean, True), spark_mode(many, clean, False), spark_mode(one, clean, False)) == (
        "application",
        "submit",
        "local",
    )
    assert spark_mode(many, StageRun("quant"), True) == "none"


def test_child_names_are_deterministic_dns_labels() -> None:
    long = names.job_name("a" * 40, "c12", "train-" + "b" * 40, 3)
    assert len(long) <= 63 and long == names.job_name("a" * 40, "c12", "train-" + "b" * 40, 3)
    assert long != names.job_name("a" * 40, "c12", "train-" + "b" * 39 + "c", 3)
    assert names.job_name("team", C1, "train-law", 1) == f"team-{C1}-train-law-1"


@pytest.mark.parametrize(
    ("expression", "zone", "expected"),
    [
        ("*/1 * * * *", None, "2026-11-23T12:01:00+00:00"),
        ("0 3 * * *", None, "2026-11-24T03:00:00+00:00"),
        ("0 3 * * *", "Europe/Berlin", "2026-11-24T02:00:00+00:00"),
        ("30 9 * * mon-fri", None, "2026-11-24T09:30:00+00:00"),
        ("@monthly", None, "2026-12-01T00:00:00+00:00"),
    ],
)
def test_next_schedule(expression: str, zone: str | None, expected: str) -> None:
    assert next_fire(expression, NOW, zone).isoformat() == expected


def test_annotation_source_marks_only_its_own_nonce() -> None:
    scheduled = {names.ANNOTATION_EVOLVE: "n2", names.ANNOTATION_EVOLVE_SOURCE: "schedule:n1"}
    manual = StackInput("team", "ns", "uid", 1, scheduled, (), False, spec(), None, StackStatus())
    assert plan(manual, Observed(now=NOW), SETTINGS).status.cycle.trigger == "annotation"
    scheduled[names.ANNOTATION_EVOLVE_SOURCE] = "schedule:n2"
    assert plan(manual, Observed(now=NOW), SETTINGS).status.cycle.trigger == "schedule"


def test_work_queue_coalesces_events_and_never_runs_a_key_twice_at_once() -> None:
    import asyncio

    from latentmas.operator.workqueue import WorkQueue

    async def scenario() -> tuple[list[str], int]:
        calls: list[str] = []
        running: set[tuple[str, str]] = set()
        overlap = 0

        async def work(key: tuple[str, str]) -> float | None:
            nonlocal overlap
            overlap += key in running
            running.add(key)
            calls.append(key[1])
            await asyncio.sleep(0.05)
            running.discard(key)
            return 0.1 if len(calls) == 1 else None

        queue = WorkQueue(work, workers=3)
        queue.start()
        for _ in range(5):
            queue.add(("ns", "a"))  # five events before the first run: one reconcile
        await asyncio.sleep(0.01)
        queue.add(("ns", "a"))  # during the run: exactly one more afterwards
        queue.add(("ns", "b"))
        for _ in range(200):  # the three runs, however slowly a loaded machine schedules them (10 s at most)
            if len(calls) >= 3 and not running:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # longer than the 0.1 s requeue the event replaced: an extra run would show up
        await queue.stop()
        return calls, overlap

    calls, overlap = asyncio.run(scenario())
    assert overlap == 0
    assert calls.count("b") == 1
    assert calls.count("a") == 2  # the event during the run replaces the requested 0.1 s requeue


def _at(the_spec: LatentMASStackSpec, status: StackStatus, generation: int) -> StackInput:
    return StackInput("team", "ns", UID, generation, {names.ANNOTATION_EVOLVE: "1"}, (), False, the_spec, None, status)


def _finish_cycle(the_spec: LatentMASStackSpec, status: StackStatus, generation: int) -> StackStatus:
    """Every stage of the running cycle wrote its manifest: the cycle succeeds in one reconcile."""
    assert status.cycle is not None
    cycle = status.cycle.id
    runs = [run_obs(run_id, "succeeded", cycle=cycle) for run_id in status.cycle.stages]
    observed = Observed(now=NOW, runs=runs, manifests=frozenset(status.cycle.stages), config_cycles=frozenset({cycle}))
    decided = plan(_at(the_spec, status, generation), observed, SETTINGS).status
    assert decided.last_cycle is not None and decided.last_cycle.id == cycle and decided.last_cycle.state == "Succeeded"
    return decided


def test_a_b_a_b_retrains_for_the_last_b_and_operational_edits_never_retrain() -> None:
    a = spec()
    b = spec(pipeline={"retry": {"retries": 1, "backoffSeconds": 10}, "cleaning": {"minChars": 5}})
    status = _finish_cycle(a, plan(_at(a, StackStatus(), 1), Observed(now=NOW), SETTINGS).status, 1)
    built: list[str] = []
    # A -> B -> A -> B, each applied after the previous cycle finished: every edit that makes the built
    # artifacts differ from the current recipe starts a cycle, including the last B.
    for generation, the_spec in enumerate([b, a, b], start=2):
        started = plan(_at(the_spec, status, generation), Observed(now=NOW), SETTINGS).status
        assert started.cycle is not None and started.cycle.trigger == "spec", f"generation {generation} not retrained"
        built.append(started.cycle.id)
        status = _finish_cycle(the_spec, started, generation)
    assert built == ["c2-0f1e2d3c", "c3-0f1e2d3c", "c4-0f1e2d3c"]
    # Operational edits (image, Job resources, retries, executors, replicas): no cycle.
    ops = spec(
        pipeline={
            "retry": {"retries": 5, "backoffSeconds": 1},
            "cleaning": {"minChars": 5, "sparkExecutors": 8},
            "training": {"image": "example/latentmas:2", "resources": {"memory": "32Gi"}},
        },
        inference={"replicas": 4},
    )
    idle = plan(_at(ops, status, 5), Observed(now=NOW), SETTINGS).status
    assert idle.cycle is None and idle.cycles_started == 4


def test_a_recipe_edit_during_a_cycle_retrains_after_it_when_the_built_recipe_differs() -> None:
    a, b = spec(), spec(pipeline={"retry": {"retries": 1, "backoffSeconds": 10}, "rag": {"fusion": "weighted"}})
    status = _finish_cycle(a, plan(_at(a, StackStatus(), 1), Observed(now=NOW), SETTINGS).status, 1)
    running_b = plan(_at(b, status, 2), Observed(now=NOW), SETTINGS).status
    assert running_b.cycle is not None
    # Back to A while B builds: nothing queued (A is built) ...
    during = plan(_at(a, running_b, 3), Observed(now=NOW), SETTINGS).status
    assert not during.pending_triggers
    # ... but once B is built, the current A differs from it: retrain.
    after = _finish_cycle(a, during, 3)
    again = plan(_at(a, after, 3), Observed(now=NOW), SETTINGS).status
    assert again.cycle is not None and again.cycle.trigger == "spec"


def test_a_status_written_by_the_older_release_is_read_without_a_spurious_retrain() -> None:
    from latentmas.operator.plan import spec_hash

    current = spec()
    legacy = StackStatus(artifacts_spec_hash=spec_hash(current), cycles_started=3, annotation_nonce="1")
    assert plan(_at(current, legacy, 7), Observed(now=NOW), SETTINGS).status.cycle is None
    edited = spec(pipeline={"retry": {"retries": 1, "backoffSeconds": 10}, "cleaning": {"minChars": 5}})
    retrain = plan(_at(edited, legacy, 8), Observed(now=NOW), SETTINGS).status
    assert retrain.cycle is not None and retrain.cycle.id == "c4-0f1e2d3c" and retrain.cycle.trigger == "spec"


def test_a_cycle_started_by_the_older_release_keeps_its_id_and_paths() -> None:
    from latentmas.operator.plan import spec_hash
    from latentmas.spec import CycleStatus, StageRunStatus

    current = spec()
    old = CycleStatus(
        id="c1", trigger="annotation", nonce="1", spec_hash=spec_hash(current), started_at="2026-11-23T11:00:00Z"
    )
    old.stages = {"clean": StageRunStatus(state="Running", attempts=1)}
    status = StackStatus(cycle=old, cycles_started=1, annotation_nonce="1")
    observed = Observed(
        now=NOW,
        runs=[run_obs("clean", "succeeded", cycle="c1")],
        manifests=frozenset({"clean"}),
        config_cycles=frozenset({"c1"}),
    )
    decided = plan(_at(current, status, 1), observed, SETTINGS)
    assert sorted(jobs_of(decided)) == ["team-c1-base-1", "team-c1-index-1", "team-c1-quant-1"]
    assert decided.status.cycle is not None and decided.status.cycle.id == "c1" and not decided.status.pending_triggers


def test_an_unreadable_status_is_reported_and_never_reuses_a_cycle_number() -> None:
    from latentmas.operator.reconciler import parse_stack

    raw = {
        "metadata": {"name": "team", "namespace": "ns", "uid": UID, "generation": 2},
        "spec": {"experts": [{"name": "law", "domain": "law"}]},
        "status": {"cyclesStarted": 7, "phase": "Sideways"},
    }
    view = parse_stack(raw)
    assert view.status.cycles_started == 7 and view.status_error is not None and "status.phase" in view.status_error
    decided = plan(view, Observed(now=NOW), SETTINGS)
    assert [e.reason for e in decided.events if e.type == "Warning"][:1] == ["StatusUnreadable"]


def _cycle_after_clean(status: StackStatus, the_spec: LatentMASStackSpec, digest: str, generation: int = 1) -> Plan:
    """The running cycle's clean Job succeeded and its manifest records `digest`."""
    assert status.cycle is not None
    cycle = status.cycle.id
    observed = Observed(
        now=NOW,
        runs=[run_obs("clean", "succeeded", cycle=cycle)],
        manifests=frozenset({"clean"}),
        config_cycles=frozenset({cycle}),
        clean_digest=digest,
    )
    return plan(_at(the_spec, status, generation), observed, SETTINGS)


def test_empty_raw_data_ends_the_cycle_as_no_new_data_without_any_job() -> None:
    started = plan(_at(spec(), StackStatus(), 1), Observed(now=NOW), SETTINGS).status
    decided = plan(_at(spec(), started, 1), Observed(now=NOW, raw_objects=0), SETTINGS)
    last = decided.status.last_cycle
    assert last is not None and (last.state, last.reason) == ("Succeeded", "NoNewData")
    assert jobs_of(decided) == [] and decided.status.artifacts_recipe_hash is None
    assert "no raw objects" in (last.message or "")


def test_unchanged_raw_data_ends_after_cleaning_but_new_data_or_a_spec_change_retrains() -> None:
    the_spec = spec()
    first = plan(_at(the_spec, StackStatus(), 1), Observed(now=NOW), SETTINGS).status
    after_clean = _cycle_after_clean(first, the_spec, "digest-1")
    assert sorted(jobs_of(after_clean)) == [f"team-{C1}-base-1", f"team-{C1}-index-1", f"team-{C1}-quant-1"]
    built = _finish_cycle(the_spec, after_clean.status, 1)
    assert built.artifacts_raw_digest == "digest-1"
    # A second manual cycle on the same raw listing: cleaned, then NoNewData; nothing else starts.
    annotated = StackInput("team", "ns", UID, 1, {names.ANNOTATION_EVOLVE: "2"}, (), False, the_spec, None, built)
    second = plan(annotated, Observed(now=NOW), SETTINGS).status
    assert second.cycle is not None and second.cycle.id == C2
    same = _cycle_after_clean(second, the_spec, "digest-1")
    assert jobs_of(same) == [] and same.status.last_cycle is not None
    assert (same.status.last_cycle.state, same.status.last_cycle.reason) == ("Succeeded", "NoNewData")
    assert same.status.artifacts_recipe_hash == built.artifacts_recipe_hash
    # New data: the cycle goes on.
    changed = _cycle_after_clean(second, the_spec, "digest-2")
    assert changed.status.cycle is not None and len(jobs_of(changed)) == 3
    # A spec-triggered cycle retrains on unchanged data.
    edited = spec(pipeline={"retry": {"retries": 1, "backoffSeconds": 10}, "cleaning": {"minChars": 5}})
    triggered = plan(_at(edited, built, 2), Observed(now=NOW, raw_objects=0), SETTINGS).status
    assert triggered.cycle is not None and triggered.cycle.trigger == "spec"
    retrain = _cycle_after_clean(triggered, edited, "digest-1", generation=2)
    assert retrain.status.cycle is not None and len(jobs_of(retrain)) == 3


def _serving(active: int, rollout: str | None = None, errors: dict[str, str] | None = None) -> StackStatus:
    """A stack whose registry promotes version 2 of everything, with one ready pod serving `active`."""
    from latentmas.registry import ArtifactEntry, Registry

    registry = Registry(
        router=ArtifactEntry(current=2), index=ArtifactEntry(current=2), experts={"law": ArtifactEntry(current=2)}
    )
    observed = Observed(
        now=NOW,
        registry=registry,
        deployment_exists=True,
        ready_replicas=1,
        pod_versions=[{"law": active, "router": active, "index": active}],
        rollout=rollout,
        reload_errors=errors or {},
    )
    return plan(_at(spec(), StackStatus(annotation_nonce="1"), 1), observed, SETTINGS).status


def _conditions(status: StackStatus) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in status.conditions}


def test_ready_needs_a_finished_rollout_and_every_target_served() -> None:
    synced = _serving(active=2)
    assert synced.phase == "Ready" and _conditions(synced)["AdaptersSynced"][:2] == ("True", "Synced")
    # The pods are ready but still serve version 1: not Ready, and the condition says which adapters lag.
    behind = _conditions(_serving(active=1))
    assert behind["Ready"][:2] == ("False", "AdaptersNotSynced")
    assert behind["AdaptersSynced"][:2] == ("False", "NotSynced") and "law 1/2" in behind["AdaptersSynced"][2]
    # A pod reports why it cannot load the target: the message carries the pod's own error.
    failing = _conditions(_serving(active=1, errors={"law": "lora_B has non-finite values"}))
    assert failing["AdaptersSynced"][:2] == ("False", "ReloadFailed")
    assert "law: lora_B has non-finite values" in failing["AdaptersSynced"][2]
    # A stuck rollout (ready replicas from the old ReplicaSet) is not Ready either.
    stuck = _serving(active=2, rollout="rollout stuck: ReplicaSet has timed out progressing")
    assert stuck.phase != "Ready"
    assert (
        _conditions(stuck)["Ready"][:2] == ("False", "InferenceNotReady") and "stuck" in _conditions(stuck)["Ready"][2]
    )


def test_rollout_pending_reads_generation_updated_replicas_and_the_progress_deadline() -> None:
    from latentmas.operator.observed import rollout_pending

    def deployment(generation: int, **status: object) -> dict:
        return {"metadata": {"generation": generation}, "status": status}

    done = deployment(3, observedGeneration=3, replicas=2, updatedReplicas=2, readyReplicas=2)
    assert rollout_pending(done, 2) is None
    assert "not observed" in (rollout_pending(deployment(4, observedGeneration=3, replicas=2), 2) or "")
    surge = deployment(3, observedGeneration=3, replicas=3, updatedReplicas=2, readyReplicas=3)
    assert "1 old" in (rollout_pending(surge, 2) or "")
    deadline = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}
    stuck = deployment(3, observedGeneration=3, replicas=2, updatedReplicas=1, readyReplicas=2, conditions=[deadline])
    assert (rollout_pending(stuck, 2) or "").startswith("rollout stuck: timed out")


def test_active_jobs_of_a_cycle_that_is_no_longer_running_are_deleted() -> None:
    """A crash after the cycle was recorded as failed but before its Jobs were deleted leaks nothing."""
    from latentmas.spec import CycleStatus

    failed = CycleStatus(
        id=C1, trigger="annotation", nonce="1", spec_hash="x", state="Failed", started_at="2026-11-23T11:00:00Z"
    )
    status = StackStatus(last_cycle=failed, cycles_started=1, annotation_nonce="1")
    observed = Observed(
        now=NOW,
        runs=[run_obs("train-law", "active"), run_obs("quant", "failed")],
        config_cycles=frozenset({C1}),
    )
    decided = plan(_at(spec(), status, 1), observed, SETTINGS)
    assert ("Job", f"team-{C1}-train-law-1") in decided.delete
    assert ("Job", f"team-{C1}-quant-1") not in decided.delete, "finished Jobs of the last cycle are kept"


def test_a_recipe_change_reruns_only_the_runs_that_depend_on_it() -> None:
    two = {"experts": [{"name": "law", "domain": "law"}, {"name": "med", "domain": "med"}]}
    a = spec(**two)
    status = _finish_cycle(a, plan(_at(a, StackStatus(), 1), Observed(now=NOW), SETTINGS).status, 1)
    assert {r.cycle for r in status.built_runs.values()} == {C1}
    cases = [
        # (edit, runs that must run again)
        (spec(**two, inference={"routingMode": "soft"}), {"evaluate", "promote"}),
        (spec(experts=[{"name": "law", "domain": "law", "maxSteps": 3}, {"name": "med", "domain": "med"}]),
         {"train-law", "evaluate", "promote"}),
        (spec(**two, pipeline={"rag": {"fusion": "weighted"}}), {"index", "promote"}),
        (spec(**two, pipeline={"cleaning": {"minChars": 5}}), {r for r in status.built_runs}),
    ]  # fmt: skip
    for generation, (edited, expected) in enumerate(cases, start=2):
        started = plan(_at(edited, status, generation), Observed(now=NOW), SETTINGS)
        cycle = started.status.cycle
        assert cycle is not None and cycle.trigger == "spec"
        rerun = {run_id for run_id, record in cycle.stages.items() if record.reused_from is None}
        assert rerun == expected, f"generation {generation}"
        assert all(cycle.stages[r].state == "Succeeded" for r in set(cycle.stages) - expected)
        configmap = next(o for o in started.create if o["kind"] == "ConfigMap")
        config = yaml.safe_load(configmap["data"]["promote.yaml"])
        assert set(config.get("inputCycles", {})) == set(cycle.stages) - expected
        assert all(n.split(f"-{cycle.id}-")[1].rsplit("-", 1)[0] in expected for n in jobs_of(started))
    # A reused run keeps pointing at the cycle that built it, across cycles.
    edited = cases[0][0]
    second = _finish_cycle(edited, plan(_at(edited, status, 9), Observed(now=NOW), SETTINGS).status, 9)
    assert second.built_runs["clean"].cycle == C1 and second.built_runs["evaluate"].cycle == "c2-0f1e2d3c"
    # New data (an annotation) re-runs everything.
    annotated = replace(_at(edited, second, 9), annotations={names.ANNOTATION_EVOLVE: "2"})
    fresh = plan(annotated, Observed(now=NOW), SETTINGS).status
    assert fresh.cycle is not None and all(r.reused_from is None for r in fresh.cycle.stages.values())
