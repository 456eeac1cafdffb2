"""The real operator, the real stages and the real registry together on the test cluster: kwok fakes
stage Pods and a test kubelet (StageExecutor) runs each Pod's container command for real against MinIO.
Then an inference server started against that registry serves the promoted experts and reports its
active versions for its (kwok) Pod; a second cycle on added data is hot-reloaded under load."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from kubernetes import client
from latentmas.jobs.corpus import default_corpus_dir, upload_corpus
from latentmas.operator import names
from latentmas.registry import load_registry
from latentmas.services.app import create_app
from latentmas.services.podstatus import parse_entry
from latentmas.services.settings import ServeSettings
from latentmas.spec import LatentMASStackSpec
from latentmas.testing.asgi import served_app
from latentmas.testing.controlplane import MANUAL_COMPLETION_ANNOTATION, Cluster
from latentmas.testing.executor import StageExecutor
from latentmas.testing.fixtures import MinioFixture
from latentmas.testing.procs import eventually

from tests.operator.conftest import OperatorProcess, apply_yaml, get_stack, new_namespace, stack_body

pytestmark = pytest.mark.e2e
DOMAINS = ("python", "linux")


def upload_subset(minio: MinioFixture, prefix: str, per_domain: int, skip: int = 0) -> int:
    """A few raw documents per domain, under the stack's own raw prefix."""
    keys = upload_corpus(
        minio.store, "raw", default_corpus_dir(), prefix, DOMAINS, per_domain=per_domain, skip_per_domain=skip
    )
    return len(keys)


@dataclass
class InCluster:
    namespace: str
    name: str
    api: client.ApiClient
    executor: StageExecutor
    minio: MinioFixture

    def status(self) -> dict:
        return get_stack(self.api, self.namespace, self.name).get("status") or {}

    def spec(self) -> LatentMASStackSpec:
        return LatentMASStackSpec.model_validate(get_stack(self.api, self.namespace, self.name)["spec"])

    def evolve(self, nonce: str) -> None:
        client.CustomObjectsApi(self.api).patch_namespaced_custom_object(
            "latentmas.io",
            "v1alpha1",
            self.namespace,
            "latentmasstacks",
            self.name,
            {"metadata": {"annotations": {"latentmas.io/evolve": nonce}}},
        )

    def patch_spec(self, change: dict) -> None:
        client.CustomObjectsApi(self.api).patch_namespaced_custom_object(
            "latentmas.io", "v1alpha1", self.namespace, "latentmasstacks", self.name, {"spec": change}
        )

    def wait_cycle_done(self, cycles: int, timeout: float) -> None:
        def finished() -> bool:
            if self.executor.failures:
                raise AssertionError("a stage failed:\n" + "\n".join(self.executor.failures))
            status = self.status()
            last = status.get("lastCycle") or {}
            return (
                status.get("cyclesStarted", 0) >= cycles
                and last.get("state") == "Succeeded"
                and not status.get("cycle")
            )

        eventually(finished, timeout, f"cycle {cycles} to finish", interval=1.0)


@pytest.fixture(scope="module")
def stack(
    cluster: Cluster, minio: MinioFixture, api: client.ApiClient, operator: OperatorProcess, tmp_path_factory
) -> Iterator[InCluster]:
    namespace = new_namespace(cluster.control_plane, minio)
    prefix = f"{namespace}/"
    upload_subset(minio, prefix, per_domain=6)
    body = stack_body(
        "real",
        namespace,
        minio,
        experts=[{"name": d, "domain": d} for d in DOMAINS],
        stagePodAnnotations={MANUAL_COMPLETION_ANNOTATION: "true"},
        pipeline={
            "cleaning": {"engine": "python", "rawPrefix": prefix, "minChars": 50},
            "training": {"maxSteps": 40, "learningRate": 2e-3, "batchSize": 4, "maxSeqLength": 128, "routerEpochs": 80},
            "retry": {"retries": 0, "backoffSeconds": 1, "deadlineSeconds": 900},
        },
        baseModel={"uri": "bootstrap", "preset": "tiny", "bootstrapSteps": 80},
        inference={"replicas": 1, "resources": {"cpu": "1", "memory": "1Gi", "gpu": 0}, "reloadPollSeconds": 1},
        # Six documents a domain cannot carry the domain gate's intervals; this test is about the operator.
        evaluation={"gate": "base", "minImprovement": 0.0},
    )
    apply_yaml(cluster.control_plane, body)
    executor = StageExecutor(
        client.CoreV1Api(api), namespace, tmp_path_factory.mktemp("kubelet"), {"OMP_NUM_THREADS": "1"}
    ).start()
    env = InCluster(namespace, "real", api, executor, minio)
    env.evolve("first")
    env.wait_cycle_done(1, 900)
    try:
        yield env
    finally:
        executor.stop()


def test_operator_runs_real_stages_and_promotes_every_expert(stack: InCluster) -> None:
    ran = {name.split("-")[3] for name in stack.executor.ran}  # real-c1-<uid8>-<stage>-…
    assert len(stack.executor.ran) >= 10, stack.executor.ran
    assert not stack.executor.failures
    registry = load_registry(stack.minio.store, "artifacts", stack.namespace, stack.name)
    assert sorted(registry.experts) == sorted(DOMAINS)
    promoted = served_experts(stack)
    assert promoted and set(promoted.values()) == {1}, f"no expert promoted: {registry.rejected}"
    refused = {r["name"] for r in registry.rejected if r["kind"] == "expert"}
    assert set(DOMAINS) - set(promoted) <= refused, "an expert without a version has its refusal recorded"
    assert registry.router.current == 1 and registry.base.current == 1
    status = stack.status()
    targets = {a["name"]: a.get("target") for a in status["adapters"]}
    assert targets == {**{d: promoted.get(d) for d in DOMAINS}, "router": 1, "index": 1}
    assert {"clean", "quant", "synth", "index", "base", "router", "evaluate", "promote"} <= set(ran)


@dataclass
class Served:
    url: str
    pod: str  # the (kwok) Pod the server reports its active versions for


@pytest.fixture(scope="module")
def served(stack: InCluster, cluster: Cluster, tmp_path_factory, monkeypatch_module) -> Iterator[Served]:
    core = client.CoreV1Api(stack.api)
    selector = f"{names.COMPONENT}=inference,{names.LABEL_STACK}={stack.name}"
    pod = eventually(lambda: core.list_namespaced_pod(stack.namespace, label_selector=selector).items, 180, "pod")[0]
    monkeypatch_module.setenv("POD_NAME", pod.metadata.name)
    monkeypatch_module.setenv("POD_NAMESPACE", stack.namespace)
    # What the operator sets on the inference container: the stack's active-versions ConfigMap.
    monkeypatch_module.setenv("LATENTMAS_STATUS_CONFIGMAP", names.active_versions_configmap(stack.name))
    monkeypatch_module.setenv("LATENTMAS_KUBECONFIG", str(cluster.kubeconfig))
    settings = ServeSettings.from_spec(
        stack.namespace, stack.name, stack.spec(), device="cpu", cache_dir=tmp_path_factory.mktemp("serve")
    )
    with served_app(create_app(settings), what="inference ready") as url:
        yield Served(url, pod.metadata.name)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def served_experts(stack: InCluster) -> dict[str, int]:
    """Expert -> promoted version, for the experts the gate let through (a real cycle may refuse some)."""
    registry = load_registry(stack.minio.store, "artifacts", stack.namespace, stack.name)
    return {n: e.current for n, e in registry.experts.items() if e.current is not None}


def active_versions(url: str) -> dict[str, int]:
    active: dict[str, int] = httpx.get(f"{url}/adapters", timeout=10).json()["active"]
    return active


def test_served_registry_answers_and_the_stack_becomes_ready(stack: InCluster, served: Served) -> None:
    promoted = served_experts(stack)
    models = {m["id"] for m in httpx.get(f"{served.url}/v1/models", timeout=10).json()["data"]}
    assert set(promoted) <= models and not (set(DOMAINS) - set(promoted)) & models
    answer = httpx.post(f"{served.url}/generate", json={"prompt": "Solve 2x + 3 = 7.", "max_tokens": 4}, timeout=60)
    assert answer.status_code == 200 and answer.json()["domain"] in (*DOMAINS, "base")
    expected = {**{d: promoted.get(d) for d in DOMAINS}, "router": 1, "index": 1}

    def reported() -> bool:
        status = stack.status()
        active = {a["name"]: a.get("active") for a in status.get("adapters", [])}
        return status.get("phase") == "Ready" and active == expected

    eventually(reported, 120, "stack Ready with the served versions reported active", interval=1.0)


def test_second_cycle_on_added_data_is_hot_reloaded_under_load(stack: InCluster, served: Served) -> None:
    before = load_registry(stack.minio.store, "artifacts", stack.namespace, stack.name)
    upload_subset(stack.minio, f"{stack.namespace}/", per_domain=6, skip=6)
    failures: list[str] = []
    answers: Counter[str] = Counter()
    stop = threading.Event()

    def load(expert: str) -> None:
        with httpx.Client(base_url=served.url, timeout=60) as http:
            while not stop.is_set():
                reply = http.post("/generate", json={"prompt": "x" * 8, "lora_adapter": expert, "max_tokens": 2})
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code}: {reply.text[:200]}")
                else:
                    answers[f"{expert}:v{reply.json()['lora']['version']}"] += 1

    loaded = set(served_experts(stack))  # an expert the first cycle refused has no worker asking for it
    workers = [threading.Thread(target=load, args=(d,), daemon=True) for d in loaded]
    for worker in workers:
        worker.start()
    try:
        # More data and longer training: a spec change to the training section starts the second cycle.
        stack.patch_spec({"pipeline": {"training": {"maxSteps": 100}}})
        stack.wait_cycle_done(2, 900)
        after = load_registry(stack.minio.store, "artifacts", stack.namespace, stack.name)
        promoted = {n for n, e in after.experts.items() if e.current != before.experts[n].current}
        assert promoted, f"the second cycle promoted nothing: {after.rejected}"
        wanted = {n: after.experts[n].current for n in DOMAINS if after.experts[n].current is not None}
        eventually(lambda: active_versions(served.url) == wanted, 180, f"active versions {wanted}")

        def answered_by_new_versions() -> bool:
            return all(answers[f"{name}:v{after.experts[name].current}"] > 0 for name in promoted & loaded)

        # Under load the workers answer with the new versions soon after the reload; wait for that, not a fixed time.
        eventually(answered_by_new_versions, 120, "requests answered by the promoted versions")
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert not failures, failures[:5]
    for name in promoted & loaded:
        assert answers[f"{name}:v{after.experts[name].current}"] > 0, answers
    core = client.CoreV1Api(stack.api)

    def published() -> tuple[dict[str, int], dict[str, str]] | None:
        """The server's entry on the active-versions board, once it names the new versions (it publishes after
        the reload, a moment after /adapters shows them)."""
        board = core.read_namespaced_config_map(names.active_versions_configmap(stack.name), stack.namespace)
        entry = (board.data or {}).get(served.pod)
        if entry is None:
            return None
        versions, errors = parse_entry(entry)
        return (versions, errors) if {k: v for k, v in versions.items() if k in DOMAINS} == wanted else None

    _, errors = eventually(published, 120, f"versions {wanted} published for pod {served.pod}")
    assert not errors
