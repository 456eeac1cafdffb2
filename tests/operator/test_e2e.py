"""End to end on the `cluster` fixture (real API server, controllers, scheduler, kwok) with the real
operator process and the real MinIO: children, an evolution cycle in dependency order up to Ready, the
schedule, spec changes, restart safety and deletion."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
from kubernetes import client
from latentmas.cycle import cycle_runs
from latentmas.operator import names
from latentmas.operator.plan import cycle_id
from latentmas.registry import ArtifactVersion, load_registry, save_registry
from latentmas.services.podstatus import ConfigMapPublisher
from latentmas.spec import LatentMASStackSpec
from latentmas.stage import MANIFEST, StageContext
from latentmas.testing.controlplane import Cluster
from latentmas.testing.fixtures import MinioFixture
from latentmas.testing.procs import eventually

from tests.operator.conftest import (
    OperatorProcess,
    apply_yaml,
    get_stack,
    new_namespace,
    stack_body,
    typed,
)
from tests.operator.stages import StageSimulator

pytestmark = [pytest.mark.operator, pytest.mark.e2e]


@dataclass
class Env:
    namespace: str
    name: str
    api: client.ApiClient
    sim: StageSimulator
    kubeconfig: Path

    def status(self) -> dict:
        return get_stack(self.api, self.namespace, self.name).get("status") or {}

    def phase(self) -> str | None:
        return self.status().get("phase")

    def cycle(self, number: int) -> str:
        """The id of the stack's n-th cycle (`c<n>-<uid prefix>`)."""
        return cycle_id(number, get_stack(self.api, self.namespace, self.name)["metadata"]["uid"])


def _env(cluster: Cluster, minio: MinioFixture, api: client.ApiClient, name: str, **spec: object) -> Env:
    namespace = new_namespace(cluster.control_plane, minio)
    apply_yaml(cluster.control_plane, stack_body(name, namespace, minio, **spec))
    return Env(namespace, name, api, StageSimulator(api, minio.store, namespace, name), cluster.kubeconfig)


@pytest.fixture(scope="module")
def scheduled(cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess) -> Env:
    """Created first, checked last: a `*/1 * * * *` schedule fires while the other tests run."""
    schedule = {"cron": "*/1 * * * *", "timeZone": "Etc/UTC", "concurrencyPolicy": "Forbid"}
    return _env(cluster, minio, api, "nightly", schedule=schedule, inference={"enabled": False})


@pytest.fixture(scope="module")
def main(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess, scheduled: Env
) -> Env:
    return _env(cluster, minio, api, "team")


def run_cycle(env: Env, until: str, timeout: float = 180) -> None:
    """Completes stage Jobs (kwok) and writes their manifests until the stack's phase is `until`."""

    def progressed() -> bool:
        env.sim.step()
        return env.phase() == until

    eventually(progressed, timeout, f"phase {until}", interval=0.2)


def test_stack_gets_children_with_owner_references(main: Env, api: client.ApiClient, cluster: Cluster) -> None:
    core, apps, rbac = client.CoreV1Api(api), client.AppsV1Api(api), client.RbacAuthorizationV1Api(api)
    ns, name = main.namespace, main.name
    deployment = eventually(lambda: _maybe(apps.read_namespaced_deployment, f"{name}-inference", ns), 120, "Deployment")
    container = deployment.spec.template.spec.containers[0]
    assert container.command[:2] == ["latentmas", "serve"]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert container.readiness_probe.http_get.path == "/ready"
    assert deployment.spec.strategy.rolling_update.max_unavailable == 0
    secret_env = {
        e.name: e.value_from.secret_key_ref.name for e in container.env if e.value_from and e.value_from.secret_key_ref
    }
    assert secret_env == {"LATENTMAS_S3_ACCESS_KEY": "s3-credentials", "LATENTMAS_S3_SECRET_KEY": "s3-credentials"}
    # The operator applies its children one by one: each is waited for, none assumed to follow the Deployment.
    service = eventually(lambda: _maybe(core.read_namespaced_service, f"{name}-inference", ns), 120, "Service")
    assert service.spec.ports[0].port == 8000
    for account in (f"{name}-jobs", f"{name}-inference"):
        eventually(partial(_maybe, core.read_namespaced_service_account, account, ns), 120, f"ServiceAccount {account}")
        binding = eventually(partial(_maybe, rbac.read_namespaced_role_binding, account, ns), 120, f"binding {account}")
        assert binding.subjects[0].name == account
    jobs_role = eventually(lambda: _maybe(rbac.read_namespaced_role, f"{name}-jobs", ns), 120, "Role jobs")
    assert not jobs_role.rules, "stage pods of a python-engine stack need no API access"
    owner = deployment.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("LatentMASStack", name, True)
    # An inference pod becomes ready through kwok, but without promoted experts the stack is not Ready.
    eventually(lambda: main.status().get("inferenceReadyReplicas") == 1, 180, "ready inference replica")
    status = main.status()
    assert status["phase"] == "Pending"
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "NotPromoted")
    assert status["endpoint"] == f"http://{name}-inference.{ns}.svc:8000"
    # Least privilege: the inference account can write only its stack's active-versions ConfigMap.
    account = f"system:serviceaccount:{ns}:{name}-inference"

    def can(verb: str, resource: str) -> str:
        args = ("auth", "can-i", verb, resource, "-n", ns, "--as", account)
        return cluster.kubectl(*args, check=False).strip()

    assert can("patch", "pods") == "no" and can("get", "pods") == "no"
    assert can("patch", f"configmaps/{name}-active-versions") == "yes"
    assert can("patch", f"configmaps/{name}-serving") == "no" and can("get", "secrets") == "no"


def test_evolve_annotation_runs_stages_in_order_until_ready(
    main: Env, cluster: Cluster, api: client.ApiClient, minio: MinioFixture, operator: OperatorProcess
) -> None:
    _, apps, batch = typed(api)
    ns, name = main.namespace, main.name
    eventually(lambda: main.status().get("inferenceReadyReplicas") == 1, 180, "ready inference replica")
    template_before = apps.read_namespaced_deployment(f"{name}-inference", ns).metadata.generation
    cluster.kubectl("annotate", "-n", ns, f"latentmasstack/{name}", f"{names.ANNOTATION_EVOLVE}=1", "--overwrite")
    c1 = main.cycle(1)
    clean = eventually(lambda: _maybe(batch.read_namespaced_job, f"{name}-{c1}-clean-1", ns), 120, "clean Job")
    container = clean.spec.template.spec.containers[0]
    assert container.command == ["latentmas", "stage", "run", "clean", "--config", "/etc/latentmas/clean.yaml"]
    assert clean.spec.backoff_limit == 0 and clean.spec.active_deadline_seconds == 600
    config = main.sim.config(c1, "clean")
    assert (config.namespace, config.stack, config.cycle_id) == (ns, name, c1)
    _publish_versions_when_promoted(main, api, minio)
    run_cycle(main, "Ready")
    assert main.sim.order_violations == []
    spec = LatentMASStackSpec.model_validate(get_stack(api, ns, name)["spec"])
    expected = [r.id for r in cycle_runs(spec)]
    assert sorted(run for _, run in main.sim.seen) == sorted(expected)
    # The inference pods report the promoted versions shortly after promotion (hot reload, no restart).
    eventually(lambda: main.status().get("expertsReady") == "2/2", 120, "served target versions")
    status = main.status()
    last = status["lastCycle"]
    assert (last["id"], last["trigger"], last["nonce"], last["state"]) == (c1, "annotation", "1", "Succeeded")
    assert {run: s["state"] for run, s in last["stages"].items()} == dict.fromkeys(expected, "Succeeded")
    assert last["stages"]["train-law"]["jobName"] == f"{name}-{c1}-train-law-1"
    adapters = {a["name"]: a for a in status["adapters"]}
    assert {k: (v["target"], v["active"]) for k, v in adapters.items()} == {
        "law": (1, 1),
        "med": (1, 1),
        "router": (1, 1),
        "index": (1, 1),
    }
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
        "AdaptersSynced": "True",
        "StorageReachable": "True",
    }
    table = cluster.kubectl("get", "lms", "-n", ns)
    assert "Ready" in table and "2/2" in table
    # Promotion hot-reloads: the inference Deployment's pod template was never touched.
    assert apps.read_namespaced_deployment(f"{name}-inference", ns).metadata.generation == template_before
    reasons = [e.reason for e in client.CoreV1Api(api).list_namespaced_event(ns).items]
    assert {"CycleStarted", "CycleSucceeded", "PhaseReady"} <= set(reasons)
    # Re-annotating with the same nonce starts nothing; the stage Jobs exist once each.
    counts = Counter(j.metadata.labels[names.LABEL_RUN] for j in batch.list_namespaced_job(ns).items)
    assert set(counts.values()) == {1}
    metrics = operator.metrics()
    assert 'latentmas_cycles_total{result="Succeeded",trigger="annotation"}' in metrics
    assert "latentmas_stage_duration_seconds_count" in metrics


def _publish_versions_when_promoted(env: Env, api: client.ApiClient, minio: MinioFixture) -> None:
    """The serving side's real publisher reports what it serves once registry.json has versions."""
    original = env.sim.write_manifest

    def write_and_publish(cycle: str, run_id: str) -> None:
        original(cycle, run_id)
        if run_id != "promote":
            return
        registry = load_registry(minio.store, "artifacts", env.namespace, env.name)
        versions = {name: entry.current for name, entry in registry.experts.items()}
        versions |= {"router": registry.router.current, "index": registry.index.current}
        pods = client.CoreV1Api(api).list_namespaced_pod(env.namespace, label_selector=f"{names.COMPONENT}=inference")
        for pod in pods.items:
            board = names.active_versions_configmap(env.name)
            publisher = ConfigMapPublisher(pod.metadata.name, env.namespace, board, kubeconfig=env.kubeconfig)
            publisher.publish(versions)

    env.sim.write_manifest = write_and_publish  # type: ignore[method-assign]


def _patch_and_wait(env: Env, cluster: Cluster, patch: dict) -> None:
    """Applies a merge patch and waits until the operator has handled that generation."""
    cluster.kubectl("patch", "-n", env.namespace, f"lms/{env.name}", "--type=merge", "-p", json.dumps(patch))
    generation = get_stack(env.api, env.namespace, env.name)["metadata"]["generation"]
    eventually(lambda: env.status().get("observedGeneration") == generation, 120, f"generation {generation} observed")


def test_spec_change_that_invalidates_artifacts_starts_a_cycle(main: Env, cluster: Cluster) -> None:
    eventually(lambda: main.phase() == "Ready", 180, "a Ready stack (after the first cycle)")
    # A -> B -> A -> B, each after the previous cycle: every recipe that differs from what is built retrains,
    # the last B included (the trigger compares built artifacts with the current recipe, not a hash history).
    for number, degree in ((2, 3), (3, 2), (4, 3)):
        _patch_and_wait(main, cluster, {"spec": {"pipeline": {"quant": {"polynomialDegree": degree}}}})
        cycle = eventually(lambda: main.status().get("cycle"), 120, f"cycle {number}")
        assert (cycle["id"], cycle["trigger"]) == (main.cycle(number), "spec")
        run_cycle(main, "Ready")
    # Operational edits (image, Job memory, retries, executors, serving limits) do not invalidate artifacts.
    operational = {
        "pipeline": {
            "training": {"image": "example.org/latentmas:2", "resources": {"memory": "9Gi"}},
            "retry": {"retries": 3},
            "cleaning": {"sparkExecutors": 3},
        },
        "inference": {"maxTokens": 99},
    }
    _patch_and_wait(main, cluster, {"spec": operational})
    assert main.status().get("cycle") is None and main.status()["cyclesStarted"] == 4


def test_stage_without_manifest_retries_then_degraded(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    env = _env(cluster, minio, api, "flaky", inference={"enabled": False})
    env.sim.withhold = {"quant"}
    cluster.kubectl("annotate", "-n", env.namespace, "lms/flaky", f"{names.ANNOTATION_EVOLVE}=go")
    run_cycle(env, "Degraded")
    status = env.status()
    quant = status["lastCycle"]["stages"]["quant"]
    assert (quant["state"], quant["attempts"]) == ("Failed", 2)
    assert "wrote no _manifest.json" in quant["message"]
    assert status["lastCycle"]["stages"]["clean"]["state"] == "Succeeded"
    degraded = {c["type"]: c for c in status["conditions"]}["Degraded"]
    assert degraded["status"] == "True" and "stage quant failed after 2 attempts" in degraded["message"]
    jobs = client.BatchV1Api(api).list_namespaced_job(env.namespace, label_selector=f"{names.LABEL_RUN}=quant")
    c1 = env.cycle(1)
    assert sorted(str(j.metadata.name) for j in jobs.items) == [f"flaky-{c1}-quant-1", f"flaky-{c1}-quant-2"]
    warnings = [
        e.reason for e in client.CoreV1Api(api).list_namespaced_event(env.namespace).items if e.type == "Warning"
    ]
    assert {"StageRetry", "CycleFailed", "PhaseDegraded"} <= set(warnings)


def test_stage_deadline_fails_job_then_degraded(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    """A pod that cannot be scheduled runs into the stage's deadline: the Job really fails."""
    env = _env(
        cluster,
        minio,
        api,
        "stuck",
        inference={"enabled": False},
        stages={"clean": {"retries": 0, "deadlineSeconds": 10, "nodeSelector": {"pool": "does-not-exist"}}},
    )
    cluster.kubectl("annotate", "-n", env.namespace, "lms/stuck", f"{names.ANNOTATION_EVOLVE}=go")
    # While it runs, the stage's progress reports (`_progress.json`) show up in the status.
    eventually(lambda: env.sim.jobs(), 120, "the clean Job")
    context = StageContext("clean", env.sim.config(env.cycle(1), "clean"), minio.store, Path("."))
    context.progress(3, 10, loss=1.5)

    def progress() -> dict | None:
        return ((env.status().get("cycle") or {}).get("stages") or {}).get("clean", {}).get("progress")

    assert eventually(progress, 120, "progress in status") == {"step": 3, "total": 10, "metrics": {"loss": 1.5}}
    eventually(lambda: env.phase() == "Degraded", 180, "Degraded after the deadline")
    clean = env.status()["lastCycle"]["stages"]["clean"]
    assert (clean["state"], clean["attempts"]) == ("Failed", 1)
    assert "DeadlineExceeded" in clean["message"]
    job = client.BatchV1Api(api).read_namespaced_job(f"stuck-{env.cycle(1)}-clean-1", env.namespace)
    assert job.spec.template.spec.node_selector == {"pool": "does-not-exist"}


def test_operator_restart_mid_cycle_creates_no_duplicate_job(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    env = _env(cluster, minio, api, "resilient", inference={"enabled": False})
    batch = client.BatchV1Api(api)
    cluster.kubectl("annotate", "-n", env.namespace, "lms/resilient", f"{names.ANNOTATION_EVOLVE}=x")
    eventually(lambda: env.sim.step() and len(env.sim.written) >= 1, 120, "clean done")
    eventually(lambda: len(batch.list_namespaced_job(env.namespace).items) >= 3, 120, "the next stage Jobs")
    operator.kill()
    # While the operator is down, the running stages finish and write their manifests.
    eventually(lambda: env.sim.step() >= 0 and len(env.sim.written) >= 3, 120, "stages finishing offline")
    operator.start()
    run_cycle(env, "Ready")
    counts = Counter(j.metadata.labels[names.LABEL_RUN] for j in batch.list_namespaced_job(env.namespace).items)
    assert set(counts.values()) == {1}, counts
    status = env.status()
    assert status["cyclesStarted"] == 1 and status["lastCycle"]["id"] == env.cycle(1)
    assert all(s["attempts"] == 1 for s in status["lastCycle"]["stages"].values())


def test_deleted_and_edited_children_are_restored(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    """Level-triggered children: a deleted Service and RoleBinding, and a Deployment whose image was set
    and which was scaled by hand, all come back to the desired state without any spec change."""
    env = _env(cluster, minio, api, "drift")
    core, apps, _ = typed(api)
    rbac = client.RbacAuthorizationV1Api(api)
    ns = env.namespace
    deployment = eventually(lambda: _maybe(apps.read_namespaced_deployment, "drift-inference", ns), 120, "Deployment")
    image = deployment.spec.template.spec.containers[0].image
    eventually(lambda: _maybe(core.read_namespaced_service, "drift-inference", ns), 120, "Service")
    eventually(lambda: _maybe(rbac.read_namespaced_role_binding, "drift-jobs", ns), 120, "RoleBinding")
    cluster.kubectl("delete", "-n", ns, "service/drift-inference")
    cluster.kubectl("delete", "-n", ns, "rolebinding/drift-jobs")
    cluster.kubectl("set", "image", "-n", ns, "deployment/drift-inference", "inference=example.org/evil:1")
    cluster.kubectl("scale", "-n", ns, "deployment/drift-inference", "--replicas=3")

    def restored() -> bool:
        current = apps.read_namespaced_deployment("drift-inference", ns)
        return bool(
            _maybe(core.read_namespaced_service, "drift-inference", ns)
            and _maybe(rbac.read_namespaced_role_binding, "drift-jobs", ns)
            and current.spec.template.spec.containers[0].image == image
            and current.spec.replicas == 1
        )

    eventually(restored, 180, "the Service, RoleBinding, image and replica count restored")


def _replica_policy(cluster: Cluster, namespace: str) -> None:
    """An admission policy of the cluster's owner: at most 2 replicas per Deployment in `namespace`."""
    name = f"max-two-replicas-{namespace}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["apps"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["deployments"],
                    }
                ]
            },
            "validations": [{"expression": "object.spec.replicas <= 2", "message": "at most 2 replicas here"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
        },
    }
    apply_yaml(cluster.control_plane, policy)
    apply_yaml(cluster.control_plane, binding)


def test_accepted_but_unusable_spec_is_degraded_with_the_api_reason(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    """A spec the CRD accepts but whose child the API refuses (here a cluster admission policy): Degraded
    with the API's message and a Warning event posted; the stack's other children are still applied and
    the stack recovers once the spec is fixed."""
    namespace = new_namespace(cluster.control_plane, minio)
    _replica_policy(cluster, namespace)
    probe = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "probe", "namespace": namespace}}
    probe["spec"] = {
        "replicas": 3,
        "selector": {"matchLabels": {"app": "probe"}},
        "template": {"metadata": {"labels": {"app": "probe"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
    }

    eventually(lambda: _policy_denies(cluster, probe), 180, "the admission policy in force")
    apply_yaml(cluster.control_plane, stack_body("broken", namespace, minio, inference={"replicas": 3}))
    env = Env(namespace, "broken", api, StageSimulator(api, minio.store, namespace, "broken"), cluster.kubeconfig)
    core, apps, _ = typed(api)

    def degraded() -> dict | None:
        found = {c["type"]: c for c in env.status().get("conditions") or []}.get("Degraded")
        return found if found and found["status"] == "True" else None

    condition = eventually(degraded, 180, "Degraded condition")
    assert condition["reason"] == "InvalidSpec", condition
    assert "Deployment broken-inference" in condition["message"] and "at most 2 replicas" in condition["message"]
    assert env.phase() == "Degraded" and env.status().get("observedGeneration", 0) < 1
    assert _maybe(core.read_namespaced_service, "broken-inference", namespace) is not None
    assert _maybe(core.read_namespaced_service_account, "broken-inference", namespace) is not None
    events = core.list_namespaced_event(namespace).items
    assert any(e.reason == "InvalidSpec" and e.type == "Warning" and "at most 2" in e.message for e in events)
    fix = [{"op": "replace", "path": "/spec/inference/replicas", "value": 1}]
    cluster.kubectl("patch", "-n", namespace, "lms/broken", "--type=json", "-p", json.dumps(fix))
    generation = get_stack(api, namespace, "broken")["metadata"]["generation"]
    eventually(lambda: env.status().get("observedGeneration") == generation, 180, "the fixed generation observed")
    assert degraded() is None
    assert apps.read_namespaced_deployment("broken-inference", namespace).spec.replicas == 1


def _policy_denies(cluster: Cluster, probe: dict) -> bool:
    done = subprocess.run(
        [*_kubectl(cluster), "apply", "--dry-run=server", "-f", "-"],
        input=json.dumps(probe),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode != 0 and "at most 2 replicas" in done.stderr


def _kubectl(cluster: Cluster) -> list[str]:
    from latentmas.testing.binaries import binary

    return [binary("kubectl"), "--kubeconfig", str(cluster.kubeconfig)]


def test_empty_or_unchanged_raw_data_ends_the_cycle_as_no_new_data(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    retry = {"retries": 1, "backoffSeconds": 1, "deadlineSeconds": 600}
    empty = _env(
        cluster, minio, api, "quiet", inference={"enabled": False},
        pipeline={"retry": retry, "cleaning": {"rawPrefix": f"nothing-{uuid.uuid4().hex}/"}},
    )  # fmt: skip
    cluster.kubectl("annotate", "-n", empty.namespace, "lms/quiet", f"{names.ANNOTATION_EVOLVE}=1")
    last = eventually(lambda: empty.status().get("lastCycle"), 120, "the cycle on an empty raw prefix")
    assert (last["state"], last.get("reason")) == ("Succeeded", "NoNewData") and not empty.sim.jobs()
    # Unchanged data: the second manual cycle cleans, then ends; new data: the third one trains again.
    prefix = f"steady-{uuid.uuid4().hex}/"
    minio.store.ensure_bucket("raw")
    minio.store.put_bytes("raw", f"{prefix}law/a.txt", b"first document")
    env = _env(
        cluster, minio, api, "steady", inference={"enabled": False},
        pipeline={"retry": retry, "cleaning": {"rawPrefix": prefix}},
    )  # fmt: skip

    def run_to_end(number: int) -> dict:
        cluster.kubectl(
            "annotate", "-n", env.namespace, "lms/steady", f"{names.ANNOTATION_EVOLVE}={number}", "--overwrite"
        )

        def ended() -> dict | None:
            env.sim.step()
            last = env.status().get("lastCycle") or {}
            return last if last.get("id") == env.cycle(number) else None

        return eventually(ended, 180, f"cycle {number} to end", interval=0.2)

    assert run_to_end(1).get("reason") is None
    run_to_end(2)
    second = env.status()["lastCycle"]
    assert (second["id"], second["state"], second.get("reason")) == (env.cycle(2), "Succeeded", "NoNewData")
    second_runs = {
        j["metadata"]["labels"][names.LABEL_RUN] for j in env.sim.jobs() if env.cycle(2) in j["metadata"]["name"]
    }
    assert second_runs == {"clean"}
    minio.store.put_bytes("raw", f"{prefix}law/b.txt", b"second document")
    run_to_end(3)
    third = env.status()["lastCycle"]
    assert (third["id"], third["state"], third.get("reason")) == (env.cycle(3), "Succeeded", None)


def test_recreated_stack_never_reuses_the_old_stacks_artifacts(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    """Deleted and re-created with the same name (artifactPolicy Retain) and another data domain: the new
    stack's cycle has its own id, so the old manifests are never taken for finished stages."""
    old = _env(cluster, minio, api, "phoenix", inference={"enabled": False})
    ns = old.namespace
    cluster.kubectl("annotate", "-n", ns, "lms/phoenix", f"{names.ANNOTATION_EVOLVE}=1")
    run_cycle(old, "Ready")
    old_cycle = old.cycle(1)
    assert minio.store.exists("artifacts", f"{ns}/phoenix/cycles/{old_cycle}/promote/{MANIFEST}")
    cluster.kubectl("delete", "-n", ns, "lms/phoenix")
    body = stack_body("phoenix", ns, minio, inference={"enabled": False})
    body["spec"]["experts"] = [{"name": "law", "domain": "tax"}, {"name": "med", "domain": "med"}]
    apply_yaml(cluster.control_plane, body)
    cluster.kubectl("annotate", "-n", ns, "lms/phoenix", f"{names.ANNOTATION_EVOLVE}=1")
    new = Env(ns, "phoenix", api, StageSimulator(api, minio.store, ns, "phoenix"), cluster.kubeconfig)
    new_cycle = new.cycle(1)
    assert new_cycle != old_cycle
    # No stage Job writes a manifest here: the clean Job completes (kwok), the old manifests do not count,
    # so the cycle fails on clean instead of "succeeding" on the old stack's artifacts.
    last = eventually(lambda: new.status().get("lastCycle"), 180, "the new stack's first cycle to end")
    assert (last["id"], last["state"]) == (new_cycle, "Failed")
    assert "stage clean failed" in last["message"] and "wrote no _manifest.json" in last["message"]
    runs = {j["metadata"]["labels"][names.LABEL_RUN] for j in new.sim.jobs() if new_cycle in j["metadata"]["name"]}
    assert runs == {"clean"}, "a stage after clean started on the old stack's artifacts"
    uid = get_stack(api, ns, "phoenix")["metadata"]["uid"]
    owner = json.loads(minio.store.get_bytes("artifacts", f"{ns}/phoenix/_stack.json"))
    assert owner["uid"] == uid
    events = client.CoreV1Api(api).list_namespaced_event(ns).items
    adopted = [e for e in events if e.reason == "ArtifactsAdopted" and e.involved_object.uid == uid]
    assert adopted and adopted[0].type == "Warning"


def test_deleting_the_stack_removes_children_and_artifacts(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    storage = {
        "endpoint": minio.endpoint,
        "credentialsSecretRef": {"name": "s3-credentials"},
        "artifactPolicy": "Delete",
    }
    env = _env(cluster, minio, api, "gone", storage=storage)
    ns = env.namespace
    core, apps, _ = typed(api)
    eventually(
        lambda: names.FINALIZER in (get_stack(api, ns, "gone")["metadata"].get("finalizers") or []), 120, "finalizer"
    )
    eventually(lambda: _maybe(apps.read_namespaced_deployment, "gone-inference", ns), 120, "Deployment")
    key = f"{ns}/gone/cycles/c0/clean/{MANIFEST}"
    minio.store.put_bytes("artifacts", key, b"{}")
    cluster.kubectl("delete", "-n", ns, "lms/gone", "--wait=false")
    eventually(lambda: not minio.store.exists("artifacts", key), 120, "artifacts purged")
    eventually(lambda: not cluster.kubectl("get", "lms", "-n", ns, "-o", "name"), 120, "stack gone")
    eventually(
        lambda: _maybe(apps.read_namespaced_deployment, "gone-inference", ns) is None, 180, "Deployment collected"
    )
    eventually(
        lambda: not core.list_namespaced_service_account(ns, label_selector=f"{names.LABEL_STACK}=gone").items,
        180,
        "SAs collected",
    )


SPARK_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {
        "name": "sparkapplications.sparkoperator.k8s.io",
        # *.k8s.io groups are protected; the real Spark operator's CRD carries the same marker.
        "annotations": {"api-approved.kubernetes.io": "unapproved, experimental-only"},
    },
    "spec": {
        "group": "sparkoperator.k8s.io",
        "scope": "Namespaced",
        "names": {"plural": "sparkapplications", "singular": "sparkapplication", "kind": "SparkApplication"},
        "versions": [
            {
                "name": "v1beta2",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def test_spark_cleaning_runs_as_sparkapplication_when_the_spark_operator_is_installed(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    """The test installs the Spark operator's CRD and plays the Spark operator (completes the app)."""
    apply_yaml(cluster.control_plane, SPARK_CRD)
    eventually(
        lambda: "sparkapplications" in cluster.kubectl("api-resources", "--api-group=sparkoperator.k8s.io"), 120, "CRD"
    )
    operator.kill()  # a fresh operator detects the CRD at once (it caches the lookup for a minute)
    operator.start()
    cleaning = {"cleaning": {"engine": "spark", "sparkExecutors": 2}, "retry": {"retries": 0}}
    env = _env(cluster, minio, api, "sparky", inference={"enabled": False}, pipeline=cleaning)
    cluster.kubectl("annotate", "-n", env.namespace, "lms/sparky", f"{names.ANNOTATION_EVOLVE}=go")
    custom = client.CustomObjectsApi(api)
    group = ("sparkoperator.k8s.io", "v1beta2", env.namespace, "sparkapplications")
    c1 = env.cycle(1)
    app = eventually(lambda: _maybe(custom.get_namespaced_custom_object, *group, f"sparky-{c1}-clean-1"), 120, "app")
    assert app["spec"]["arguments"] == ["stage", "run", "clean", "--config", "/etc/latentmas/clean.yaml"]
    assert app["spec"]["executor"]["instances"] == 2
    assert app["spec"]["driver"]["envSecretKeyRefs"]["LATENTMAS_S3_ACCESS_KEY"]["name"] == "s3-credentials"
    # A Spark driver may start executor pods: its account is bound to the static spark-driver ClusterRole.
    rbac = client.RbacAuthorizationV1Api(api)
    binding = eventually(
        lambda: _maybe(rbac.read_namespaced_role_binding, "sparky-jobs-spark", env.namespace), 120, "spark binding"
    )
    assert (binding.role_ref.kind, binding.role_ref.name) == ("ClusterRole", "latentmas-spark-driver")
    assert binding.subjects[0].name == "sparky-jobs"
    # The driver writes the manifest, then the application completes.
    env.sim.write_manifest(c1, "clean")
    finished = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    status = {"status": {"applicationState": {"state": "COMPLETED"}, "terminationTime": finished}}
    custom.patch_namespaced_custom_object_status(*group, f"sparky-{c1}-clean-1", status)
    eventually(
        lambda: _maybe(client.BatchV1Api(api).read_namespaced_job, f"sparky-{c1}-quant-1", env.namespace), 120, "quant"
    )
    clean = env.status()["cycle"]["stages"]["clean"]
    assert (clean["state"], clean["kind"]) == ("Succeeded", "SparkApplication")


def test_schedule_creates_cronjob_and_starts_a_cycle(scheduled: Env, api: client.ApiClient) -> None:
    batch = client.BatchV1Api(api)
    cron = eventually(
        lambda: _maybe(batch.read_namespaced_cron_job, "nightly-evolve", scheduled.namespace), 120, "CronJob"
    )
    assert (cron.spec.schedule, cron.spec.time_zone, cron.spec.concurrency_policy) == (
        "*/1 * * * *",
        "Etc/UTC",
        "Forbid",
    )
    pod = cron.spec.job_template.spec.template.spec
    assert pod.containers[0].command[:3] == ["latentmas", "trigger", "nightly"]
    assert pod.service_account_name == "nightly-trigger"
    # The operator applies the CronJob before it writes the status that carries the next fire time.
    eventually(lambda: scheduled.status().get("nextSchedule"), 120, "nextSchedule in status")

    def started() -> dict | None:
        status = scheduled.status()
        return status.get("cycle") or status.get("lastCycle")

    cycle = eventually(started, 180, "a scheduled cycle", interval=1)
    assert cycle["trigger"] == "schedule"
    assert cycle["nonce"].startswith("nightly-evolve-")
    # lastSchedule mirrors the CronJob's status.lastScheduleTime, which the CronJob controller writes after it
    # creates the Job that starts the cycle: a status with the cycle may not carry it yet.
    eventually(lambda: scheduled.status().get("lastSchedule"), 120, "lastSchedule in status")


def _maybe(read, *args):
    try:
        return read(*args)
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise


def test_trigger_command_annotates_the_stack(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    env = _env(cluster, minio, api, "manual", inference={"enabled": False})
    cli = [
        sys.executable,
        "-c",
        "from latentmas.cli import main; main()",
        "trigger",
        "--kubeconfig",
        str(cluster.kubeconfig),
    ]
    done = subprocess.run(
        [*cli, "manual", "-n", env.namespace, "--source", "schedule", "--nonce", "n1"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    annotations = get_stack(api, env.namespace, "manual")["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_EVOLVE] == "n1"
    cycle = eventually(lambda: env.status().get("cycle"), 120, "a cycle")
    assert (cycle["nonce"], cycle["trigger"]) == ("n1", "schedule")
    missing = subprocess.run([*cli, "nope", "-n", env.namespace], capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"latentmas trigger: error: cannot annotate {env.namespace}/nope: 404 Not Found"


def _ready(env: Env) -> tuple[str, str]:
    ready = {c["type"]: c for c in env.status().get("conditions") or []}.get("Ready") or {}
    return ready.get("status", ""), ready.get("reason", "")


def test_ready_stays_false_while_active_differs_from_target_and_during_a_stuck_rollout(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    """On the real control plane: a promoted version the pods do not serve yet keeps Ready False
    (AdaptersNotSynced) until they report it; a rollout whose new pod cannot be scheduled keeps Ready
    False (InferenceNotReady) although the old pod is still ready, until the rollout finishes."""
    env = _env(cluster, minio, api, "rollout")
    ns = env.namespace
    eventually(lambda: env.status().get("inferenceReadyReplicas") == 1, 180, "ready inference replica")
    _publish_versions_when_promoted(env, api, minio)
    cluster.kubectl("annotate", "-n", ns, "lms/rollout", f"{names.ANNOTATION_EVOLVE}=1", "--overwrite")
    run_cycle(env, "Ready")
    # A new target version (as a promotion writes it) that no pod serves yet.
    registry = load_registry(minio.store, "artifacts", ns, "rollout")
    entry = registry.experts["law"]
    entry.history.append(ArtifactVersion(version=entry.next_version(), prefix="v2/", files={}, cycle="c2"))
    entry.current = 2
    save_registry(minio.store, "artifacts", ns, "rollout", registry)
    eventually(lambda: _ready(env) == ("False", "AdaptersNotSynced"), 180, "Ready=False while active != target")
    assert env.phase() != "Ready"
    synced = {c["type"]: c for c in env.status()["conditions"]}["AdaptersSynced"]
    assert synced["status"] == "False" and "law 1/2" in synced["message"]
    served = {"law": 2, "med": 1, "router": 1, "index": 1}
    for pod in client.CoreV1Api(api).list_namespaced_pod(ns, label_selector=f"{names.COMPONENT}=inference").items:
        ConfigMapPublisher(pod.metadata.name, ns, "rollout-active-versions", kubeconfig=env.kubeconfig).publish(served)
    eventually(lambda: _ready(env) == ("True", "Serving"), 180, "Ready once the pods serve the target")
    # A rollout that cannot finish: the new pod template's node selector matches no node.
    _patch_and_wait(env, cluster, {"spec": {"nodeSelector": {"latentmas.test/nowhere": "true"}}})
    eventually(lambda: _ready(env) == ("False", "InferenceNotReady"), 180, "Ready=False during the stuck rollout")
    status = env.status()
    assert status["inferenceReadyReplicas"] == 1, "the old pod still serves: readyReplicas alone would say Ready"
    assert status["phase"] != "Ready"
    _patch_and_wait(env, cluster, {"spec": {"nodeSelector": None}})
    eventually(lambda: _ready(env) == ("True", "Serving"), 180, "Ready again once the rollout finished")


def test_serving_config_changes_roll_the_inference_pods_and_training_edits_do_not(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    env = _env(cluster, minio, api, "rolls")
    _, apps, _ = typed(api)
    ns = env.namespace

    def template() -> tuple:
        found = apps.read_namespaced_deployment("rolls-inference", ns)
        annotations = found.spec.template.metadata.annotations or {}
        return found.metadata.generation, annotations.get(names.ANNOTATION_SERVING_CONFIG, "")

    eventually(lambda: _maybe(apps.read_namespaced_deployment, "rolls-inference", ns), 120, "Deployment")
    eventually(lambda: env.status().get("observedGeneration") == 1, 120, "generation 1 observed")
    generation, checksum = template()
    assert checksum, "the pod template carries the serving-config checksum"
    # Training, data, evaluation and schedule edits (and scaling) never restart the inference pods.
    training = {"pipeline": {"training": {"maxSteps": 7, "batchSize": 2}}, "evaluation": {"minImprovement": 0.5}}
    _patch_and_wait(env, cluster, {"spec": {**training, "experts": [{"name": "law", "domain": "law", "maxSteps": 3}]}})
    _patch_and_wait(env, cluster, {"spec": {"inference": {"replicas": 2}}})
    replicas_generation, same = template()
    assert same == checksum and replicas_generation == generation + 1, "only the replica count changed"
    # A serving setting the server reads once at start rolls the pods.
    _patch_and_wait(env, cluster, {"spec": {"inference": {"maxTokens": 64}}})
    rolled_generation, rolled = template()
    assert rolled != checksum and rolled_generation == replicas_generation + 1


def test_a_recipe_change_reruns_only_the_dependent_stages(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    """Routing mode is part of the evaluate recipe only: the spec-triggered cycle creates Jobs for
    evaluate and promote alone; every other run is reused from the cycle that built it, and the stages
    that run read those runs' artifacts from there."""
    env = _env(cluster, minio, api, "partial")
    ns = env.namespace
    eventually(lambda: env.status().get("inferenceReadyReplicas") == 1, 180, "ready inference replica")
    _publish_versions_when_promoted(env, api, minio)
    cluster.kubectl("annotate", "-n", ns, "lms/partial", f"{names.ANNOTATION_EVOLVE}=1", "--overwrite")
    run_cycle(env, "Ready")
    c1, c2 = env.cycle(1), env.cycle(2)
    cluster.kubectl(
        "patch", "-n", ns, "lms/partial", "--type=merge", "-p", '{"spec":{"inference":{"routingMode":"soft"}}}'
    )
    eventually(lambda: (env.status().get("cycle") or {}).get("id") == c2, 120, "the spec-triggered cycle")
    run_cycle(env, "Ready")
    last = env.status()["lastCycle"]
    assert (last["id"], last["trigger"], last["state"]) == (c2, "spec", "Succeeded")
    _, _, batch = typed(api)
    ran = {
        j.metadata.labels[names.LABEL_RUN]
        for j in batch.list_namespaced_job(ns, label_selector=f"{names.LABEL_CYCLE}={c2}").items
    }
    assert ran == {"evaluate", "promote"}
    reused = {run: s.get("reusedFrom") for run, s in last["stages"].items()}
    assert reused == {**dict.fromkeys(reused, c1), "evaluate": None, "promote": None}
    context = StageContext("evaluate", env.sim.config(c2, "evaluate"), minio.store, Path("."))
    assert f"/cycles/{c1}/train/law/" in context.prefix("train", "law")
    assert f"/cycles/{c2}/evaluate/" in context.prefix()
    built = env.status()["builtRuns"]
    assert built["clean"]["cycle"] == c1 and built["evaluate"]["cycle"] == c2
    # A -> B -> A -> B: each return to a recipe the artifacts were not built from retrains, the last B too.
    for cycle_number, mode in ((3, "top1"), (4, "soft")):
        cycle = env.cycle(cycle_number)
        patch = json.dumps({"spec": {"inference": {"routingMode": mode}}})
        cluster.kubectl("patch", "-n", ns, "lms/partial", "--type=merge", "-p", patch)

        def started(wanted: str = cycle) -> bool:
            return bool((env.status().get("cycle") or {}).get("id") == wanted)

        eventually(started, 180, f"cycle {cycle} for {mode}")
        run_cycle(env, "Ready")
        last = env.status()["lastCycle"]
        assert (last["id"], last["trigger"], last["state"]) == (cycle, "spec", "Succeeded")
        assert env.status()["builtRuns"]["evaluate"]["cycle"] == cycle, f"{mode}: evaluate not rebuilt"


def test_pdb_with_several_replicas_and_an_hpa_owns_the_replica_count(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess
) -> None:
    env = _env(cluster, minio, api, "scaled", inference={"replicas": 2, "resources": {"cpu": "1", "memory": "1Gi"}})
    ns = env.namespace
    core, apps, _ = typed(api)
    policy, autoscaling = client.PolicyV1Api(api), client.AutoscalingV2Api(api)
    pdb = eventually(lambda: _maybe(policy.read_namespaced_pod_disruption_budget, "scaled-inference", ns), 120, "PDB")
    assert pdb.spec.max_unavailable == 1
    assert core.read_namespaced_service("scaled-inference", ns).spec.session_affinity == "ClientIP"
    scaling = {"enabled": True, "minReplicas": 2, "maxReplicas": 4, "targetCpuUtilization": 60}
    _patch_and_wait(env, cluster, {"spec": {"inference": {"autoscaling": scaling}}})
    hpa = autoscaling.read_namespaced_horizontal_pod_autoscaler("scaled-inference", ns)
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (2, 4)
    eventually(lambda: (apps.read_namespaced_deployment("scaled-inference", ns).spec.replicas or 0) >= 2, 180, "min 2")
    # What the HPA decides is kept: the operator no longer applies a replica count.
    cluster.kubectl("scale", "-n", ns, "deployment/scaled-inference", "--replicas=3")
    _patch_and_wait(env, cluster, {"spec": {"stagePodAnnotations": {"example.com/reconciled": "yes"}}})
    assert apps.read_namespaced_deployment("scaled-inference", ns).spec.replicas == 3
    # One replica without an HPA: both objects go, the spec's count is applied again.
    _patch_and_wait(env, cluster, {"spec": {"inference": {"replicas": 1, "autoscaling": {"enabled": False}}}})
    eventually(lambda: apps.read_namespaced_deployment("scaled-inference", ns).spec.replicas == 1, 120, "1 replica")
    eventually(
        lambda: (
            _maybe(policy.read_namespaced_pod_disruption_budget, "scaled-inference", ns) is None
            and _maybe(autoscaling.read_namespaced_horizontal_pod_autoscaler, "scaled-inference", ns) is None
        ),
        120,
        "PDB and HPA deleted",
    )
