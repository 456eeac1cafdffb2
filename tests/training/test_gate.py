"""Pure decisions (the expert gate's own cases are in test_evalgate.py): router readiness, tensor shapes
against the base, rollback, training arguments per device, and routing modes."""

from __future__ import annotations

import pytest
import torch
from latentmas.registry import ArtifactEntry, ArtifactVersion, Registry
from latentmas.spec import LatentMASStackSpec, LoraSpec
from latentmas.training.data import parse_sft
from latentmas.training.gate import adapter_shape_problems, router_decision, router_shape_problems
from latentmas.training.registryops import previous_version, rolled_back
from latentmas.training.router_model import apply_mode
from latentmas.training.sft import expert_spec, lora_config, sft_arguments

pytestmark = pytest.mark.training


def test_router_gate_needs_accuracy_and_promoted_experts() -> None:
    assert router_decision(0.95, 0.9, ["a", "b"], {"a", "b"}).promote
    assert "0.8000 < required 0.9000" in router_decision(0.8, 0.9, ["a", "b"], {"a", "b"}).reason
    partial = router_decision(1.0, 0.9, ["a", "b"], {"a"})
    assert partial.promote and "b without a promoted version: the base answers them" in partial.reason
    assert not router_decision(1.0, 0.9, ["a", "b"], set()).promote
    assert router_shape_problems({"input_dim": 64, "feature_layer": 1, "experts": ["a", "b"]}, 64, 2, ["a", "b"]) == []
    problems = router_shape_problems({"input_dim": 32, "feature_layer": 5, "experts": ["b", "a"]}, 64, 2, ["a", "b"])
    assert len(problems) == 3


def test_adapter_shapes_are_checked_against_the_base() -> None:
    base = {"model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.0.mlp.up_proj.weight": (172, 64)}
    good = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (8, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (64, 8),
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": (8, 64),
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": (172, 8),
    }
    assert adapter_shape_problems(good, base, 8) == []
    wrong = {**good, "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": (256, 8)}
    assert "expected (172, 8)" in adapter_shape_problems(wrong, base, 8)[0]
    extra = {**good, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": (8, 64)}
    assert "has no weight model.layers.9" in adapter_shape_problems(extra, base, 8)[0]
    assert adapter_shape_problems({}, base, 8) == ["the adapter holds no LoRA weights"]


def version(n: int) -> ArtifactVersion:
    return ArtifactVersion(version=n, prefix=f"p/v{n}/", files={"a": "0" * 64})


def test_rollback_moves_the_pointer_back_and_keeps_history() -> None:
    registry = Registry(experts={"fin": ArtifactEntry(current=3, history=[version(1), version(2), version(3)])})
    back = rolled_back(registry, "expert", "fin")
    assert back.experts["fin"].current == 2 and len(back.experts["fin"].history) == 3
    assert registry.experts["fin"].current == 3, "the input registry must not change"
    assert rolled_back(back, "expert", "fin").experts["fin"].current == 1
    with pytest.raises(ValueError, match="oldest"):
        previous_version(ArtifactEntry(current=1, history=[version(1)]))
    with pytest.raises(ValueError, match="nothing is promoted"):
        rolled_back(registry, "router", "router")
    with pytest.raises(ValueError, match="'med' is not in the registry"):
        rolled_back(registry, "expert", "med")


def test_sft_lines_must_be_chat_examples() -> None:
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "domain": "d"}'
    assert len(parse_sft(good + "\n\n" + good, "x.jsonl")) == 2
    with pytest.raises(ValueError, match=r"x\.jsonl:2: expected messages"):
        parse_sft(good + '\n{"messages": [{"role": "user", "content": "q"}]}', "x.jsonl")


def test_training_arguments_follow_the_spec_and_the_device(tmp_path: object) -> None:
    spec = LatentMASStackSpec.model_validate(
        {
            "experts": [
                {"name": "fin", "domain": "finance", "maxSteps": 7, "lora": {"rank": 4, "targetModules": ["q_proj"]}}
            ],
            "pipeline": {"training": {"learningRate": 1e-3, "batchSize": 2, "seed": 5, "saveSteps": 3}},
        }
    )
    expert = spec.experts[0]
    cpu = sft_arguments(spec, expert, str(tmp_path), gpu=False)
    assert (cpu.max_steps, cpu.learning_rate, cpu.per_device_train_batch_size) == (7, 1e-3, 2)
    # the data arrives pre-tokenized with answer-only labels (latentmas.chat), not for trl to mask
    assert (cpu.seed, cpu.data_seed, cpu.save_steps, cpu.assistant_only_loss) == (5, 5, 3, False)
    assert not cpu.bf16 and not cpu.activation_checkpointing
    lora = lora_config(expert.lora, ["q_proj", "v_proj", "down_proj"])
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (4, 16, {"q_proj"})
    discovered = lora_config(LoraSpec(), ["q_proj", "down_proj"])  # no targetModules: the model's own
    assert set(discovered.target_modules) == {"q_proj", "down_proj"}
    with pytest.raises(KeyError, match="'med' is not in the spec"):
        expert_spec(spec, "med")


def test_routing_modes_keep_the_top_experts() -> None:
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    assert torch.equal(apply_mode(weights, "soft"), weights)
    assert torch.equal(apply_mode(weights, "top1"), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    top2 = apply_mode(weights, "top2")
    assert torch.allclose(top2, torch.tensor([[0.625, 0.375, 0.0], [0.0, 2 / 9, 7 / 9]]))
    with pytest.raises(ValueError, match="unknown routing mode"):
        apply_mode(weights, "top3")


def test_a_new_base_is_promoted_only_with_every_serving_expert() -> None:
    from latentmas.training.gate import Decision, base_change_decision

    passing, failing = Decision(True, "ok"), Decision(False, "worse")
    everyone = {"a", "b", "c"}
    assert base_change_decision(False, {"a": failing}, everyone).promote, "an unchanged base does not gate experts"
    assert base_change_decision(True, {"a": passing, "b": passing}, everyone).promote
    refused = base_change_decision(True, {"a": passing, "b": failing, "c": failing}, everyone)
    assert (
        not refused.promote
        and "experts b, c failed" in refused.reason
        and "current base keeps serving" in refused.reason
    )
    only_c_serves = base_change_decision(True, {"a": passing, "b": failing, "c": failing}, {"c"})
    assert not only_c_serves.promote and "experts c failed" in only_c_serves.reason
    first = base_change_decision(True, {"a": passing, "b": failing}, set())
    assert first.promote and "b had no version to keep" in first.reason, "a first cycle is not held back by b"
    assert base_change_decision(True, {"a": failing}, set()).promote, "a first base serves alone when nothing passes"


def test_base_mismatch_names_both_identities() -> None:
    from latentmas.training.gate import base_mismatch

    served = {"identity": "a" * 64, "model_type": "llama", "hidden_size": 576}
    assert base_mismatch(dict(served), served) is None
    for change in ({"identity": "b" * 64}, {"hidden_size": 64}, {"model_type": "qwen2"}):
        message = base_mismatch({**served, **change}, served)
        assert message is not None and "served base is [llama hidden=576 id=aaaaaaaaaaaaaaaa]" in message
        assert str(next(iter(change.values())))[:16] in message


def test_same_base_reads_current_and_previous_identities() -> None:
    from latentmas.training.baseimport import base_identity, same_base

    files = {"config.json": "1" * 64, "model.safetensors": "2" * 64, "tokenizer.json": "3" * 64}
    assert same_base(base_identity(files), files), "the current identity: a digest of the whole file set"
    assert same_base("2" * 64, files), "the previous identity: sha256 of model.safetensors"
    assert not same_base("3" * 64, files) and not same_base(None, files)
    assert base_identity(files) != base_identity({**files, "tokenizer.json": "4" * 64})


def test_the_base_gate_needs_only_the_gain_over_the_base() -> None:
    """`evaluation.gate: base` (smoke tests on a handful of documents): no interval, no other experts."""
    from latentmas.training.gate import expert_decision

    def gain(value: float, low: float) -> dict[str, float]:
        return {"gain": value, "low": low, "high": value + 0.1, "documents": 1}

    entry = {"comparisons": {"base": gain(0.05, -0.2), "other": gain(-0.1, -0.3)}}
    assert not expert_decision(entry, 0.01).promote, "the domain gate refuses one document and a worse expert"
    assert expert_decision(entry, 0.01, "base").promote
    assert not expert_decision(entry, 0.1, "base").promote, "below the margin"
    regressed = {**entry, "vs_promoted": {"gain": -0.02, "low": -0.05, "high": 0.0, "documents": 1, "version": 1}}
    assert "regresses against promoted v1" in expert_decision(regressed, 0.01, "base").reason
