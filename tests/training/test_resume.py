"""A training run stopped part-way (as a preempted Job would be) resumes from its last checkpoint in
object storage and ends with exactly the adapter an uninterrupted run produces."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from latentmas.stage import MANIFEST, stage_context
from latentmas.testing.fixtures import MinioFixture
from latentmas.training.sft import train_expert
from safetensors.torch import load
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tests.training.conftest import EXPERTS, Cycle, new_cycle, stack_spec

pytestmark = pytest.mark.training


class Killed(Exception):
    """Stands in for SIGKILL: the process stops mid-training and writes nothing more."""


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step >= self.step:
            raise Killed(f"stopped at step {state.global_step}")


def adapter_tensors(cycle: Cycle, expert: str) -> dict[str, torch.Tensor]:
    key = (
        f"default/{cycle.config.stack}/cycles/{cycle.config.cycle_id}/train/{expert}/adapter/adapter_model.safetensors"
    )
    return load(cycle.store.get_bytes("artifacts", key))


def test_killed_training_resumes_from_its_last_checkpoint(cycle1: Cycle, minio: MinioFixture) -> None:
    base = cycle1.read_json("base", "base.json")
    spec = stack_spec(minio, EXPERTS, base_uri=f"s3://artifacts/{base['prefix']}")
    cycle = new_cycle(minio, "resume", "r1", spec)
    cycle.run("base")
    assert cycle.read_json("base", "base.json")["source"].startswith("s3://artifacts/")
    config = cycle.config.model_copy(update={"expert": "fin"})
    with stage_context("train", config, minio.store) as ctx, pytest.raises(Killed):
        train_expert(ctx, spec.experts[0], callbacks=[StopAt(25)])
    prefix = "default/resume/cycles/r1/train/fin/"
    assert not minio.store.exists("artifacts", prefix + MANIFEST)
    latest = json.loads(minio.store.get_bytes("artifacts", prefix + "checkpoints/latest.json"))
    assert latest["step"] == 20, "saveSteps is 10 and the run died at step 25"
    stored = {o.key.split("/")[-2] for o in minio.store.list("artifacts", prefix + "checkpoints/checkpoint-")}
    assert stored == {"checkpoint-20"}, "older checkpoints are pruned once a newer one is committed"

    metrics = cycle.run("train", "fin")["metrics"]
    assert (metrics["resumed_from_step"], metrics["steps_this_run"], metrics["steps"]) == (20, 10, 30)
    resumed, uninterrupted = adapter_tensors(cycle, "fin"), adapter_tensors(cycle1, "fin")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in resumed.items():
        assert torch.allclose(tensor, uninterrupted[name], atol=1e-5), f"{name} differs from the uninterrupted run"
