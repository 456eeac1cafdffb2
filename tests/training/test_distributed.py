"""Data-parallel training on CPU with gloo: the train stage under `torchrun --nproc-per-node 2` (two
processes, each half of the global batch, the loss averaged over all ranks' tokens) produces the same
adapter as one process with the same global batch, and so does the indexed Job rendered for
`nodes: 2` when its two pods' container commands run (a c10d rendezvous between two torchrun agents).
Plus the pure Kubernetes rendering of gpu > 1 and nodes > 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from latentmas.cycle import StageRun
from latentmas.operator.children import StackRef
from latentmas.operator.stagejobs import cycle_configmap, stage_object
from latentmas.spec import LatentMASStackSpec, SecretKeyRef, TrainingSpec
from latentmas.store import ACCESS_KEY_ENV, SECRET_KEY_ENV
from latentmas.testing.fixtures import MinioFixture
from latentmas.training.distributed import distributed_train_job, per_rank_batch, rendezvous_service
from safetensors.torch import load

from tests.training.conftest import Cycle, new_cycle, stack_spec

pytestmark = pytest.mark.training
BIN = Path(sys.executable).parent
# float32 on CPU: the two runs differ only in reduction order (one batch vs an all-reduce of two halves).
TOLERANCE = 1e-5


def adapter(minio: MinioFixture, cycle: str) -> dict[str, torch.Tensor]:
    key = f"default/dist/cycles/{cycle}/train/fin/adapter/adapter_model.safetensors"
    return load(minio.store.get_bytes("artifacts", key))


def train(minio: MinioFixture, config_json: str, tmp_path: Path, processes: int) -> None:
    config = tmp_path / f"train-{processes}.json"
    config.write_text(config_json)
    stage = ["stage", "run", "train", "--config", str(config)]
    if processes == 1:
        command = [str(BIN / "latentmas"), *stage]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command = [*launcher, "--no-python", str(BIN / "latentmas"), *stage]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


@dataclass
class OneProcess:
    """The reference: base and a one-process train of `fin` in cycle "one"; other cycles start from its base."""

    minio: MinioFixture
    spec: LatentMASStackSpec
    one: Cycle

    def cycle(self, name: str, spec: LatentMASStackSpec | None = None) -> Cycle:
        cycle = new_cycle(self.minio, "dist", name, spec or self.spec)
        for item in list(self.minio.store.list("artifacts", "default/dist/cycles/one/base/")):
            data = self.minio.store.get_bytes("artifacts", item.key)
            self.minio.store.put_bytes("artifacts", item.key.replace("/one/", f"/{name}/", 1), data)
        return cycle

    def assert_same_adapter(self, other: Cycle) -> None:
        one, two = adapter(self.minio, "one"), adapter(self.minio, other.config.cycle_id)
        assert one.keys() == two.keys()
        moved = max(float(t.abs().max()) for name, t in one.items() if "lora_B" in name)  # lora_B starts at zero
        worst = max(float((one[name] - two[name]).abs().max()) for name in one)
        print(f"{other.config.cycle_id}: max |one - two| = {worst:.2e}, max |lora_B| = {moved:.2e}")
        assert moved > 100 * TOLERANCE, "training moved the adapter too little for the comparison to mean anything"
        assert worst <= TOLERANCE
        metrics = [c.read_json("train", "metrics.json", "fin") for c in (self.one, other)]
        assert metrics[0]["steps"] == metrics[1]["steps"] == 6
        assert abs(metrics[0]["train_loss"] - metrics[1]["train_loss"]) <= 1e-3
        assert metrics[0]["tokens_seen"] == metrics[1]["tokens_seen"]


@pytest.fixture(scope="module")
def one_process(minio: MinioFixture, model_cache: str, tmp_path_factory: pytest.TempPathFactory) -> OneProcess:
    experts = [{"name": "fin", "domain": "finance", "lora": {"dropout": 0.0}}]
    spec = stack_spec(minio, experts)
    spec.base_model.bootstrap_steps = 5
    spec.pipeline.training.max_steps = 6
    spec.pipeline.training.save_steps = 100
    one = new_cycle(minio, "dist", "one", spec)
    one.run("base")
    train(minio, one.config.model_copy(update={"expert": "fin"}).model_dump_json(), tmp_path_factory.mktemp("one"), 1)
    return OneProcess(minio, spec, one)


def test_two_gloo_processes_train_the_adapter_of_one(one_process: OneProcess, tmp_path: Path) -> None:
    two = one_process.cycle("two")
    train(one_process.minio, two.config.model_copy(update={"expert": "fin"}).model_dump_json(), tmp_path, 2)
    one_process.assert_same_adapter(two)


def pod_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's env as the kubelet resolves it (values, and Secret keys by reference)."""
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def test_rendered_multi_node_job_trains_the_adapter_of_one(one_process: OneProcess, tmp_path: Path) -> None:
    """The indexed Job and headless Service the operator renders for `nodes: 2`, run as two local "pods":
    each executes the rendered container command with the env the kubelet gives it (the container's
    env with the Secret resolved, JOB_COMPLETION_INDEX, its own /tmp), the ConfigMap's files where the
    volume mounts them, and the rendezvous Service's DNS name of pod 0 mapped to 127.0.0.1."""
    spec = one_process.spec.model_copy(deep=True)
    spec.pipeline.training.nodes = 2
    spec.storage.credentials_secret_ref = SecretKeyRef(name="s3")
    secrets = {"s3": {"accessKey": os.environ[ACCESS_KEY_ENV], "secretKey": os.environ[SECRET_KEY_ENV]}}
    nodes = one_process.cycle("nodes", spec)
    stack, run = StackRef(name="dist", namespace="default", uid="uid-1"), StageRun("train", "fin")
    configmap = cycle_configmap(stack, spec, "nodes", [run])
    job = stage_object(stack, spec, "nodes", run, 1, spark_operator=False)
    service = rendezvous_service(job, spec.pipeline.training)
    name, pod = job["metadata"]["name"], job["spec"]["template"]["spec"]
    assert service is not None and job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    # Pod i of an indexed Job is named <job>-<i>; with the Service as its subdomain it resolves as below.
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    container = pod["containers"][0]
    endpoint = next(arg for arg in container["command"] if arg.startswith("--rdzv-endpoint="))
    host, port = endpoint.removeprefix("--rdzv-endpoint=").rsplit(":", 1)
    assert host == f"{name}-0.{pod['subdomain']}.default.svc" and int(port) == service["spec"]["ports"][0]["port"]

    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    config_dir = tmp_path / "config"  # the ConfigMap volume
    config_dir.mkdir()
    for file, text in configmap["data"].items():
        (config_dir / file).write_text(text)
    local = f"--rdzv-endpoint=127.0.0.1:{free_port()}"  # the Service's DNS name of pod 0, here
    command = [
        local if arg == endpoint else arg.replace(mount["mountPath"], str(config_dir)) for arg in container["command"]
    ]
    bin_dir = tmp_path / "bin"  # the image's PATH: torchrun as pip installs it, and latentmas
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(
        f"#!{sys.executable}\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n"
    )
    (bin_dir / "torchrun").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in (ACCESS_KEY_ENV, SECRET_KEY_ENV)}
    pods = []
    for index in range(job["spec"]["completions"]):
        work = tmp_path / f"pod-{index}"  # the pod's own /tmp (an emptyDir)
        work.mkdir()
        kubelet = {"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{name}-{index}", "TMPDIR": str(work)}
        path = {"PATH": f"{bin_dir}:{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
        env = {**base, **pod_env(container, secrets), **kubelet, **path}
        with (work / "log").open("w") as log:
            pods.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), work / "log"))
    for process, output in pods:
        assert process.wait(timeout=900) == 0, output.read_text()[-4000:]
    one_process.assert_same_adapter(nodes)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_batch_must_divide_over_the_processes() -> None:
    assert per_rank_batch(8, 2) == 4
    with pytest.raises(ValueError, match=r"^pipeline.training.batchSize 8 does not divide over 3 training processes$"):
        per_rank_batch(8, 3)


def job() -> dict:
    container = {"name": "stage", "command": ["latentmas", "stage", "run", "train", "--config", "/c/train-fin.yaml"]}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "s-c1-train-fin-1", "namespace": "team", "labels": {"a": "b"}},
        "spec": {"template": {"spec": {"containers": [container]}}},
    }


def test_rendering_one_gpu_multi_gpu_and_multi_node() -> None:
    single = TrainingSpec.model_validate({"resources": {"gpu": 1}})
    assert distributed_train_job(job(), single) == job() and rendezvous_service(job(), single) is None

    multi_gpu = TrainingSpec.model_validate({"resources": {"gpu": 4}})
    rendered = distributed_train_job(job(), multi_gpu)
    command = rendered["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:5] == ["torchrun", "--nnodes=1", "--nproc-per-node=4", "--standalone", "--no-python"]
    assert command[5:] == job()["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "completionMode" not in rendered["spec"]

    nodes = TrainingSpec.model_validate({"resources": {"gpu": 2}, "nodes": 3})
    rendered = distributed_train_job(job(), nodes)
    pod = rendered["spec"]["template"]["spec"]
    assert rendered["spec"]["completionMode"] == "Indexed"
    assert rendered["spec"]["completions"] == rendered["spec"]["parallelism"] == 3
    service = rendezvous_service(job(), nodes)
    assert service is not None and pod["subdomain"] == service["metadata"]["name"] == "s-c1-train-fin-1-rdzv"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "s-c1-train-fin-1"}
    endpoint = "--rdzv-endpoint=s-c1-train-fin-1-0.s-c1-train-fin-1-rdzv.team.svc:29400"
    assert endpoint in pod["containers"][0]["command"] and "--nnodes=3" in pod["containers"][0]["command"]
    assert json.loads(json.dumps(rendered)) == rendered  # plain JSON, as the API server takes it
