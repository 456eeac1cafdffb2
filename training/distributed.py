"""Data-parallel training beyond one process: torchrun inside the train pod (`gpu > 1`), and across pods
(`nodes > 1`) an indexed Job whose pods meet at a c10d rendezvous on pod 0 through a headless Service.

Rank 0 runs the stage as usual (manifest, artifacts, progress); the other ranks run the same stage
function against a store that drops writes, so every artifact is written once. The global batch is
`pipeline.training.batch_size` whatever the world size (each rank takes its share), and the Trainer
averages the loss over the tokens of all ranks (`average_tokens_across_devices`), so a run on N
processes follows the one-process run. Rendering here is pure (spec + Job in, objects out)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentmas.spec import TrainingSpec
from latentmas.stage import StageConfig, manifest_key, resolve, stage_context
from latentmas.store import ObjectInfo, ObjectStore, open_store

RENDEZVOUS_PORT = 29400


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (one process when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Each rank's share of the global batch; a one-line error when it does not divide evenly."""
    if global_batch % world_size:
        raise ValueError(
            f"pipeline.training.batchSize {global_batch} does not divide over {world_size} training processes"
        )
    return global_batch // world_size


class FollowerStore:
    """A non-zero rank's view of the object store: reads pass through, writes are dropped (rank 0 writes)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    def ensure_bucket(self, bucket: str) -> None:
        return None

    def bucket_exists(self, bucket: str) -> bool:
        return self.inner.bucket_exists(bucket)

    def put_bytes(self, bucket: str, key: str, data: bytes) -> str:
        return ""

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self.inner.get_bytes(bucket, key)

    def put_file(self, bucket: str, key: str, path: Path) -> str:
        return ""

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        self.inner.get_file(bucket, key, path)

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        return self.inner.stat(bucket, key)

    def exists(self, bucket: str, key: str) -> bool:
        return self.inner.exists(bucket, key)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(bucket, prefix)

    def delete(self, bucket: str, key: str) -> None:
        return None

    def get_with_etag(self, bucket: str, key: str) -> tuple[bytes, str]:
        return self.inner.get_with_etag(bucket, key)

    def iter_bytes(self, bucket: str, key: str, block: int) -> Iterator[bytes]:
        return self.inner.iter_bytes(bucket, key, block)

    def put_bytes_if(self, bucket: str, key: str, data: bytes, etag: str | None) -> str:
        return ""


def run_follower(stage: str, config: StageConfig) -> None:
    """A non-zero rank: the stage function (it joins rank 0's collectives) with writes dropped; nothing
    to do when rank 0 will reuse a finished manifest."""
    store = open_store(config.spec.storage)
    if store.exists(config.spec.storage.artifacts_bucket, manifest_key(config, stage)):
        return
    with stage_context(stage, config, FollowerStore(store)) as ctx:
        resolve(stage)(ctx)


# ---- rendering (pure) -----------------------------------------------------------------------------------
def distributed(training: TrainingSpec) -> bool:
    return training.resources.gpu > 1 or training.nodes > 1


def rendezvous_service_name(job_name: str) -> str:
    return f"{job_name}-rdzv"[:63]


def torchrun_command(command: list[str], training: TrainingSpec, job_name: str, namespace: str) -> list[str]:
    """The stage command under torchrun: one process per GPU (at least one), and with several nodes a
    c10d rendezvous on pod 0 of the indexed Job (reached by its stable name through the headless Service)."""
    per_node = max(training.resources.gpu, 1)
    launcher = ["torchrun", f"--nnodes={training.nodes}", f"--nproc-per-node={per_node}"]
    if training.nodes > 1:
        host = f"{job_name}-0.{rendezvous_service_name(job_name)}.{namespace}.svc"
        launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{RENDEZVOUS_PORT}", f"--rdzv-id={job_name}"]
    else:
        launcher += ["--standalone"]
    return [*launcher, "--no-python", *command]


def distributed_train_job(job: dict[str, Any], training: TrainingSpec) -> dict[str, Any]:
    """The train Job rendered for data parallelism (unchanged for one GPU on one node): the container runs
    under torchrun; with `nodes > 1` the Job is Indexed (one pod per node, all running at once, each
    with a stable hostname under the rendezvous Service)."""
    if not distributed(training):
        return job
    rendered = copy.deepcopy(job)
    name, namespace = rendered["metadata"]["name"], rendered["metadata"].get("namespace", "default")
    pod = rendered["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["command"] = torchrun_command(container["command"], training, name, namespace)
    if training.nodes > 1:
        rendered["spec"].update(completionMode="Indexed", completions=training.nodes, parallelism=training.nodes)
        pod["subdomain"] = rendezvous_service_name(name)
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    return rendered


def rendezvous_service(job: dict[str, Any], training: TrainingSpec) -> dict[str, Any] | None:
    """The headless Service that gives the indexed Job's pods DNS names (None for a single node)."""
    if training.nodes <= 1:
        return None
    meta = job["metadata"]
    selector = {"batch.kubernetes.io/job-name": meta["name"]}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": rendezvous_service_name(meta["name"]),
            "namespace": meta.get("namespace", "default"),
            "labels": dict(meta.get("labels", {})),
            "ownerReferences": copy.deepcopy(meta.get("ownerReferences", [])),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }
