"""Operator benchmark on the real test bed (kube-apiserver + controllers + kwok, MinIO, the real
operator process):

1. annotation -> first stage Job created, p50/p95 over N cycles of one stack, against a baseline
   measured in the same run: a minimal in-process controller (one watch, one create) doing the same
   step, i.e. the floor the API server allows;
2. full cycle time (annotation -> cycle Succeeded) with every stage's manifest already in MinIO, so
   it measures orchestration only;
3. M stacks created at once: time until all are Ready, operator peak RSS and reconcile rate, with
   the single-stack cycle time as the baseline.

    .venv/bin/python -m bench.operator [--cycles 20] [--stacks 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from latentmas.cycle import cycle_runs
from latentmas.operator import kube, names
from latentmas.operator.plan import cycle_id
from latentmas.registry import ArtifactEntry, ArtifactVersion, Registry, save_registry
from latentmas.spec import LatentMASStackSpec
from latentmas.stage import MANIFEST, StageConfig, StageContext
from latentmas.store import S3Store
from latentmas.testing.controlplane import Cluster, ControlPlane
from latentmas.testing.objectstore import MinioServer
from latentmas.testing.procs import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stack_body(name: str, namespace: str, endpoint: str, annotate: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotate:
        meta["annotations"] = {names.ANNOTATION_EVOLVE: annotate}
    return {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": meta,
        "spec": {
            "storage": {"endpoint": endpoint, "credentialsSecretRef": {"name": "s3"}},
            "experts": [{"name": "law", "domain": "law"}],
            "inference": {"enabled": False},
        },
    }


def prewrite(store: S3Store, namespace: str, stack: str, uid: str, cycles: int) -> None:
    """Every stage's manifest for the stack's cycles 1..N, and a registry: stages 'finish' as soon as they start."""
    spec = LatentMASStackSpec.model_validate(stack_body(stack, namespace, "x:1")["spec"] | {"storage": {}})
    for number in range(1, cycles + 1):
        for run in cycle_runs(spec):
            cycle = cycle_id(number, uid)
            config = StageConfig(namespace=namespace, stack=stack, cycle_id=cycle, expert=run.expert, spec=spec)
            StageContext(run.stage, config, store, Path(".")).put_json(MANIFEST, {"stage": run.stage})
    registry = Registry(experts={"law": ArtifactEntry()})
    for entry in (registry.experts["law"], registry.router, registry.index):
        entry.history.append(ArtifactVersion(version=1, prefix="v1/", files={}))
        entry.current = 1
    save_registry(store, "artifacts", namespace, stack, registry)


def annotate(api: client.ApiClient, namespace: str, name: str, value: str) -> None:
    body = {"metadata": {"annotations": {names.ANNOTATION_EVOLVE: value}}}
    kube.patch(api, "LatentMASStack", namespace, name, body)


def wait_for(check: Any, timeout: float, interval: float = 0.01) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if check():
            return time.perf_counter() - start
        time.sleep(interval)
    raise TimeoutError("benchmark step timed out")


def baseline_controller(api: client.ApiClient, namespace: str, reps: int) -> list[float]:
    """The same step by a minimal controller: watch ConfigMaps, on a changed annotation create a Job."""
    kube.create(api, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ping", "namespace": namespace}})
    seen: dict[str, float] = {}
    ready = threading.Event()

    def controller() -> None:
        stream = watch.Watch()
        core = client.CoreV1Api(api)
        ready.set()
        for event in stream.stream(core.list_namespaced_config_map, namespace, timeout_seconds=600):
            value = (event["object"].metadata.annotations or {}).get("ping")
            if value and value not in seen:
                seen[value] = time.perf_counter()
                job = {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": {"name": f"ping-{value}", "namespace": namespace},
                    "spec": {
                        "template": {
                            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
                        }
                    },
                }
                kube.create(api, job)
                if len(seen) == reps:
                    stream.stop()

    thread = threading.Thread(target=controller, daemon=True)
    thread.start()
    ready.wait()
    time.sleep(0.5)
    latencies = []
    batch = client.BatchV1Api(api)
    for i in range(reps):
        start = time.perf_counter()
        kube.patch(api, "ConfigMap", namespace, "ping", {"metadata": {"annotations": {"ping": str(i)}}})
        wait_for(lambda i=i: _exists(batch, f"ping-{i}", namespace), 30)
        latencies.append(time.perf_counter() - start)
    return latencies


def _exists(batch: client.BatchV1Api, name: str, namespace: str) -> bool:
    try:
        batch.read_namespaced_job(name, namespace)
    except client.ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def _established(api: client.ApiClient) -> bool:
    url = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/latentmasstacks.latentmas.io"
    conditions = (kube.request(api, "GET", url).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def _uid(api: client.ApiClient, namespace: str, name: str) -> str:
    """Cycle ids (and so the prewritten manifests' paths) carry the stack's uid."""
    found = kube.get(api, "LatentMASStack", namespace, name)
    assert found is not None, f"stack {namespace}/{name} is gone"
    return str(found["metadata"]["uid"])


def status(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    found = kube.get(api, "LatentMASStack", namespace, name) or {}
    return found.get("status") or {}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(metrics_port: int, prefix: str) -> float:
    """Sum of the samples whose line starts with `prefix` on the operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def reconciles(metrics_port: int) -> float:
    return metric(metrics_port, "latentmas_operator_reconciles_total{")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--stacks", type=int, default=50)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="latentmas-bench-operator-"))
    plane = ControlPlane(work / "cp")
    cluster = Cluster(plane)
    minio = MinioServer(work / "minio")
    operator: ServerProcess | None = None
    try:
        print("starting control plane, cluster, MinIO ...", file=sys.stderr)
        plane.start()
        cluster.start()
        minio.start()
        store = S3Store(minio.endpoint, minio.access_key, minio.secret_key, secure=False, region="us-east-1")
        for bucket in ("raw", "artifacts"):
            store.ensure_bucket(bucket)
        store.put_bytes("raw", "bench/doc.txt", b"a raw document (an empty raw bucket ends cycles as NoNewData)")
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "latentmasstack.yaml"))
        api = kube.api_client(str(plane.kubeconfig))
        wait_for(lambda: _established(api), 60, interval=0.2)
        metrics_port, health = free_port(), free_port()
        argv_op = [
            sys.executable, "-c", "from latentmas.cli import main; main()", "operator", "run",
            "--kubeconfig", str(plane.kubeconfig), "--metrics-port", str(metrics_port), "--health-port", str(health),
            "--poll-seconds", "1", "--resync-seconds", "30", "--manifest-grace-seconds", "3",
        ]  # fmt: skip
        operator = ServerProcess("operator", argv_op, work / "logs")
        operator.wait_until(lambda: reconciles(metrics_port) >= 0, 60, "operator metrics")
        namespace = "bench"
        plane.kubectl("create", "namespace", namespace)
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": namespace},
                  "stringData": {"accessKey": minio.access_key, "secretKey": minio.secret_key}}  # fmt: skip
        kube.create(api, secret)

        print(f"baseline: minimal controller, {args.cycles} reps ...", file=sys.stderr)
        floor = baseline_controller(api, namespace, args.cycles)

        print(f"single stack: {args.cycles} cycles ...", file=sys.stderr)
        kube.create(api, stack_body("solo", namespace, minio.endpoint))
        wait_for(lambda: status(api, namespace, "solo").get("phase"), 60)
        solo_uid = _uid(api, namespace, "solo")
        prewrite(store, namespace, "solo", solo_uid, args.cycles)
        batch = client.BatchV1Api(api)
        first_job, full_cycle = [], []
        for number in range(1, args.cycles + 1):
            start = time.perf_counter()
            annotate(api, namespace, "solo", str(number))
            cycle = cycle_id(number, solo_uid)
            first_job.append(wait_for(lambda c=cycle: _exists(batch, f"solo-{c}-clean-1", namespace), 60))
            cycle_done = lambda c=cycle: (status(api, namespace, "solo").get("lastCycle") or {}).get("id") == c  # noqa: E731
            wait_for(cycle_done, 120, interval=0.05)
            full_cycle.append(time.perf_counter() - start)
        assert status(api, namespace, "solo")["lastCycle"]["state"] == "Succeeded"

        print(f"{args.stacks} stacks at once ...", file=sys.stderr)
        many = "fleet"
        plane.kubectl("create", "namespace", many)
        kube.create(api, {**secret, "metadata": {"name": "s3", "namespace": many}})
        before, peak = reconciles(metrics_port), rss_mb(operator.proc.pid)
        start = time.perf_counter()
        for i in range(args.stacks):
            kube.create(api, stack_body(f"s{i}", many, minio.endpoint, annotate="1"))
            prewrite(store, many, f"s{i}", _uid(api, many, f"s{i}"), 1)
        phases: dict[str, int] = {}
        while time.perf_counter() - start < 600:
            listing = kube.request(api, "GET", f"/apis/latentmas.io/v1alpha1/namespaces/{many}/latentmasstacks")
            items = listing["items"]
            phases = {}
            for item in items:
                phase = (item.get("status") or {}).get("phase", "none")
                phases[phase] = phases.get(phase, 0) + 1
            peak = max(peak, rss_mb(operator.proc.pid))
            if phases.get("Ready") == args.stacks:
                break
            time.sleep(0.5)
        fleet_seconds = time.perf_counter() - start
        rate = (reconciles(metrics_port) - before) / fleet_seconds
        report = {
            "cycles": args.cycles,
            "baseline_controller_p50_s": statistics.median(floor),
            "baseline_controller_p95_s": percentile(floor, 0.95),
            "annotation_to_first_job_p50_s": statistics.median(first_job),
            "annotation_to_first_job_p95_s": percentile(first_job, 0.95),
            "ratio_first_job_p50_vs_baseline": statistics.median(first_job) / statistics.median(floor),
            "full_cycle_p50_s": statistics.median(full_cycle),
            "full_cycle_p95_s": percentile(full_cycle, 0.95),
            "stacks": args.stacks,
            "stacks_ready": phases.get("Ready", 0),
            "stacks_all_ready_s": fleet_seconds,
            "ratio_fleet_vs_single_cycle": fleet_seconds / statistics.median(full_cycle),
            "operator_peak_rss_mb": peak,
            "reconciles_per_s": rate,
            "reconcile_mean_s": metric(metrics_port, "latentmas_operator_reconcile_seconds_sum")
            / max(metric(metrics_port, "latentmas_operator_reconcile_seconds_count"), 1.0),
        }
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}, indent=2))
    finally:
        if operator is not None:
            operator.stop()
        minio.stop()
        cluster.stop()
        plane.stop()


if __name__ == "__main__":
    main()
