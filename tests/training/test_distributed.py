"""Data-parallel training on CPU with gloo: the train stage under `torchrun --nproc-per-node 2` (two
processes, each half of the global batch, the loss averaged over all ranks' tokens) produces the same
adapter as one process with the same global batch. Plus the pure Kubernetes rendering of gpu > 1 and
nodes > 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from latentmas.spec import TrainingSpec
from latentmas.testing.fixtures import MinioFixture
from latentmas.training.distributed import distributed_train_job, per_rank_batch, rendezvous_service
from safetensors.torch import load

from tests.training.conftest import new_cycle, stack_spec

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


def test_two_gloo_processes_train_the_adapter_of_one(minio: MinioFixture, model_cache: str, tmp_path: Path) -> None:
    experts = [{"name": "fin", "domain": "finance", "lora": {"dropout": 0.0}}]
    spec = stack_spec(minio, experts)
    spec.base_model.bootstrap_steps = 5
    spec.pipeline.training.max_steps = 6
    spec.pipeline.training.save_steps = 100
    cycles = {cycle: new_cycle(minio, "dist", cycle, spec) for cycle in ("one", "two")}
    cycles["one"].run("base")
    base = "default/dist/cycles/one/base/"
    for item in list(minio.store.list("artifacts", base)):  # both runs start from the same base
        data = minio.store.get_bytes("artifacts", item.key)
        minio.store.put_bytes("artifacts", item.key.replace("/one/", "/two/", 1), data)
    for cycle, processes in (("one", 1), ("two", 2)):
        train(minio, cycles[cycle].config.model_copy(update={"expert": "fin"}).model_dump_json(), tmp_path, processes)
    one, two = adapter(minio, "one"), adapter(minio, "two")
    assert one.keys() == two.keys()
    moved = max(float(t.abs().max()) for name, t in one.items() if "lora_B" in name)  # lora_B starts at zero
    worst = max(float((one[name] - two[name]).abs().max()) for name in one)
    print(f"max |one - two| = {worst:.2e}, max |lora_B| = {moved:.2e}")
    assert moved > 100 * TOLERANCE, "training moved the adapter too little for the comparison to mean anything"
    assert worst <= TOLERANCE
    metrics = [cycles[c].read_json("train", "metrics.json", "fin") for c in ("one", "two")]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 6
    assert abs(metrics[0]["train_loss"] - metrics[1]["train_loss"]) <= 1e-3
    assert metrics[0]["tokens_seen"] == metrics[1]["tokens_seen"]


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
