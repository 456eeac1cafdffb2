"""Session fixtures: one real MinIO, sample data in the data plane's formats, and two evolution cycles
trained once (tiny model) and shared by the tests of this folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from latentmas.registry import Registry, load_registry
from latentmas.spec import LatentMASStackSpec
from latentmas.stage import StageConfig, run_stage
from latentmas.store import S3Store
from latentmas.testing.fixtures import MinioFixture
from latentmas.training.modelstore import CACHE_ENV

from tests.training.sampledata import write_index_bundle, write_sample_data

STACK = "team"
TRAINING = {
    "maxSteps": 30,
    "saveSteps": 10,
    "learningRate": 2e-3,
    "batchSize": 8,
    "maxSeqLength": 128,
    "routerEpochs": 150,
}


def stack_spec(minio: MinioFixture, experts: list[dict[str, Any]], base_uri: str = "bootstrap") -> LatentMASStackSpec:
    return LatentMASStackSpec.model_validate(
        {
            "storage": minio.storage.model_dump(by_alias=True),
            "baseModel": {"uri": base_uri, "preset": "tiny", "bootstrapSteps": 60},
            "experts": experts,
            "pipeline": {"training": TRAINING},
            "evaluation": {"minRouterAccuracy": 0.9},
        }
    )


EXPERTS = [{"name": "fin", "domain": "finance"}, {"name": "med", "domain": "medicine"}]


@dataclass
class Cycle:
    """One evolution cycle's training half, run through the real stage contract."""

    store: S3Store
    config: StageConfig
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, stage: str, expert: str | None = None) -> dict[str, Any]:
        config = self.config.model_copy(update={"expert": expert})
        manifest = run_stage(stage, config, self.store)
        print(f"{self.config.cycle_id} {stage} {expert or ''}: {manifest['durationSeconds']}s")
        self.manifests[f"{stage}-{expert}" if expert else stage] = manifest
        return manifest

    def read_json(self, stage: str, name: str, expert: str | None = None) -> Any:
        sub = f"{stage}/{expert}/" if expert else f"{stage}/"
        key = f"default/{self.config.stack}/cycles/{self.config.cycle_id}/{sub}{name}"
        return json.loads(self.store.get_bytes("artifacts", key))

    def registry(self) -> Registry:
        return load_registry(self.store, "artifacts", "default", self.config.stack)

    def run_all(self) -> Cycle:
        self.run("base")
        for expert in self.config.spec.experts:
            self.run("train", expert.name)
        for stage in ("router", "evaluate", "promote"):
            self.run(stage)
        return self


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Two busy cores shared with other test runs: one intra-op thread avoids oversubscription stalls
    (measured 7x faster for the tiny model under load)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private model cache, so tests exercise the download path and leave nothing in $HOME."""
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("model-cache"))
    yield os.environ[CACHE_ENV]
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


def new_cycle(minio: MinioFixture, stack: str, cycle: str, spec: LatentMASStackSpec) -> Cycle:
    config = StageConfig(stack=stack, cycle_id=cycle, spec=spec)
    write_sample_data(config, minio.store)
    return Cycle(minio.store, config)


@pytest.fixture(scope="session")
def cycle1(minio: MinioFixture, model_cache: str) -> Cycle:
    """Bootstrap -> two experts -> router -> evaluate -> promote, with an index bundle to register."""
    cycle = new_cycle(minio, STACK, "c1", stack_spec(minio, EXPERTS))
    write_index_bundle(cycle.config, minio.store)
    return cycle.run_all()


@pytest.fixture(scope="session")
def cycle2(cycle1: Cycle, minio: MinioFixture) -> Cycle:
    """A second cycle on the promoted base: `fin` is deliberately crippled (one step at a tiny learning
    rate, so it is worse than its promoted v1); `med` trains twice as long and should improve."""
    experts = [
        {"name": "fin", "domain": "finance", "maxSteps": 1, "learningRate": 1e-7},
        {"name": "med", "domain": "medicine", "maxSteps": 60},
    ]
    return new_cycle(minio, STACK, "c2", stack_spec(minio, experts)).run_all()
