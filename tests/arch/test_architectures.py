"""The architecture suite: a tiny random checkpoint of every supported family (Llama, SmolLM-style tied
Llama, Qwen2, Qwen3, Mistral with a short sliding window), each with its own test-written chat
template, goes train -> serve: a few LoRA steps through the training code's SFTTrainer, then the
multi-LoRA engine serves it. Later engine work must keep this green for every family."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from latentmas.chat import encode_conversation, encode_prompt, end_of_turn_ids, pad_token_id
from latentmas.prompts import request_messages, training_messages
from latentmas.services.alignment import alignment_for
from latentmas.services.engine import Engine, Sequence
from latentmas.services.latent_pipeline import LatentConfig, run_latent
from latentmas.services.lora import install_multi_lora, load_peft_adapter
from latentmas.services.sampling import SamplingParams
from latentmas.services.text_pipeline import Sampling
from latentmas.spec import LatentMASStackSpec
from latentmas.training.architectures import SUPPORTED_MODEL_TYPES, check_architecture, discover_target_modules
from latentmas.training.losses import activate, encode_examples, mixed_score, score
from latentmas.training.router_model import encode_prompts, prompt_features
from latentmas.training.sft import save_adapter, sft_arguments, sft_trainer
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.arch.models import ARCHITECTURES, FAMILIES, build_checkpoint

pytestmark = pytest.mark.arch
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# float32 on CPU: the batched path sums the same products in a different order than PEFT.
TOLERANCE = 1e-4
QA = [
    ("How do I open a file for reading?", "Use open(path)."),
    ("What is a bond yield?", "The return, as a rate."),
    ("Which court hears appeals?", "The appellate court."),
    ("What dose is safe?", "Ask a doctor."),
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Trained:
    base: Path
    adapter: Path
    noise: Path
    losses: list[float]


def random_adapter(base: Path, folder: Path, seed: int) -> Path:
    """A PEFT LoRA on the discovered targets with random A and B (a second, clearly different adapter)."""
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=discover_target_modules(model)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_adapter(peft_model, folder, str(base))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """Every family's checkpoint with one adapter trained by the training code and one random adapter."""
    spec = LatentMASStackSpec.model_validate(
        {
            "experts": [{"name": "qa", "domain": "qa"}],
            "pipeline": {"training": {"maxSteps": 40, "batchSize": 4, "learningRate": 3e-2, "maxSeqLength": 256}},
        }
    )
    out: dict[str, Trained] = {}
    for arch in ARCHITECTURES:
        root = tmp_path_factory.mktemp(arch)
        base = build_checkpoint(arch, root / "base")
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base)
        args = sft_arguments(spec, spec.experts[0], str(root / "run"), gpu=False)
        args.logging_steps = 1
        trainer = sft_trainer(model, tokenizer, [training_messages(q, a) for q, a in QA], args, spec.experts[0].lora)
        trainer.train()
        save_adapter(trainer.model, root / "adapter", str(base))
        losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
        out[arch] = Trained(base, root / "adapter", random_adapter(base, root / "noise", seed=7), losses)
    return out


def test_supported_types_pass_and_others_fail_with_the_list() -> None:
    for model_type in SUPPORTED_MODEL_TYPES:
        check_architecture({"model_type": model_type})
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        check_architecture({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="None is not supported"):
        check_architecture({})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_mask_covers_the_answer_and_its_end_of_turn_only(arch: str, trained: dict[str, Trained]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(trained[arch].base)
    family = FAMILIES[arch]
    assert "{% generation" not in family.template
    for question, answer in QA:
        ids, labels = encode_conversation(tokenizer, training_messages(question, answer))
        learned = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
        assert learned == answer + family.end_of_turn
        # everything before the answer is exactly what serving feeds the model for the same question
        served = encode_prompt(tokenizer, request_messages(prompt=question))
        assert ids[: len(served)] == served and labels[len(served) - 1] == -100 and labels[len(served)] != -100
    assert tokenizer.convert_tokens_to_ids(family.end_of_turn) in end_of_turn_ids(tokenizer)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_learns_and_saves_a_lora_on_every_projection(arch: str, trained: dict[str, Trained]) -> None:
    run = trained[arch]
    assert run.losses[-1] < 0.5 * run.losses[0], run.losses
    tensors = load_file(str(run.adapter / "adapter_model.safetensors"))
    assert sorted(p.name for p in run.adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [k for k in tensors if "embed" in k or "lm_head" in k]
    assert {k.split(".")[-3] for k in tensors} == set(PROJECTIONS)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_evaluation_scores_the_adapter_below_the_base_alone_and_in_a_mixture(
    arch: str, trained: dict[str, Trained]
) -> None:
    run = trained[arch]
    tokenizer = AutoTokenizer.from_pretrained(run.base)
    team = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base), run.adapter, adapter_name="qa")
    team.load_adapter(run.noise, adapter_name="noise")
    team.eval()
    examples = encode_examples(tokenizer, [training_messages(q, a) for q, a in QA], max_length=256)
    with team.disable_adapter():
        base = score(team, examples, pad_token_id(tokenizer))
    activate(team, ["qa"])
    expert = score(team, examples, pad_token_id(tokenizer))
    gates = torch.tensor([[0.9, 0.1]] * len(QA))
    mixed = mixed_score(team, examples, gates, ["qa", "noise"], pad_token_id(tokenizer))
    assert (
        expert.tokens
        == base.tokens
        == mixed.tokens
        == sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for _, a in QA)
    )
    assert expert.loss < 0.5 * base.loss and mixed.loss < base.loss


def _peft_logits(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    model: Any = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=torch.tensor([ids])).logits[0]
    return logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_adapter_batch_matches_peft_per_adapter(arch: str, trained: dict[str, Trained]) -> None:
    """Rows with the trained adapter, the random one and the bare base, left-padded differently (longer
    than Mistral's sliding window of 8), in one batch, against PEFT's own forward per row."""
    run = trained[arch]
    tokenizer = AutoTokenizer.from_pretrained(run.base)
    model = AutoModelForCausalLM.from_pretrained(run.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=2, max_rank=8)
    served.write_slot(0, load_peft_adapter(run.adapter, served.shapes))
    served.write_slot(1, load_peft_adapter(run.noise, served.shapes))
    prompts = [encode_prompt(tokenizer, request_messages(prompt=q)) for q, _ in QA[:3]]
    prompts[2] = prompts[2][:12]
    adapters = [run.adapter, run.noise, None]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    served.context.indices = torch.tensor([[0], [1], [0]])
    served.context.weights = torch.tensor([[1.0], [1.0], [0.0]])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
    served.context.indices = served.context.weights = None
    for row, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        reference = _peft_logits(run.base, adapter, prompt)
        got = batched[row, width - len(prompt) :]
        assert torch.allclose(got, reference, atol=TOLERANCE, rtol=0), (
            f"{arch} row {row}: {(got - reference).abs().max()}"
        )
        if adapter is not None:  # the adapter really changes the output, so the equality is not vacuous
            assert (reference - _peft_logits(run.base, None, prompt)).abs().max() > 1e-2


def _generate(engine: Engine, jobs: list[tuple[list[int], list[tuple[int, float]]]], max_tokens: int) -> list[Sequence]:
    done = threading.Semaphore(0)
    seqs = [
        Sequence(ids, SamplingParams(max_tokens=max_tokens), mix, lambda _: None, lambda _: done.release())
        for ids, mix in jobs
    ]
    for seq in seqs:
        engine.submit(seq)
    for _ in seqs:
        assert done.acquire(timeout=60)
    return seqs


@pytest.mark.parametrize("chunk", [512, 5])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_engine_answers_like_training_taught_and_stops_at_the_end_of_turn(
    arch: str, chunk: int, trained: dict[str, Trained]
) -> None:
    """The trained adapter, served with the serving prompt, reproduces its training answer and stops at the
    template's end-of-turn token, which never shows; the base row in the same batch decodes like its own
    greedy reference. Also with the prompts prefilled 5 columns per step (Mistral's sliding window is
    shorter than the prompts, so chunks attend across its edge)."""
    run = trained[arch]
    tokenizer = AutoTokenizer.from_pretrained(run.base)
    model = AutoModelForCausalLM.from_pretrained(run.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=1, max_rank=8)
    served.write_slot(0, load_peft_adapter(run.adapter, served.shapes))
    engine = Engine(served, tokenizer, max_batch_size=4, prefill_chunk=chunk).start()
    question, answer = QA[0]
    prompt = encode_prompt(tokenizer, request_messages(prompt=question))
    try:
        taught, base = _generate(engine, [(prompt, [(0, 1.0)]), (prompt, [])], max_tokens=24)
    finally:
        engine.stop()
    assert (taught.finish_reason, taught.text) == ("stop", answer)
    reference = AutoModelForCausalLM.from_pretrained(run.base).eval()
    out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=engine.eos_ids)
    expected = [int(t) for t in out[0, len(prompt) :] if int(t) not in engine.eos_ids]
    assert base.output_ids == expected
    assert base.text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_router_features_and_latent_pipeline_run(arch: str, trained: dict[str, Trained]) -> None:
    run = trained[arch]
    tokenizer = AutoTokenizer.from_pretrained(run.base)
    model = AutoModelForCausalLM.from_pretrained(run.base).eval()
    ids, mask = encode_prompts(tokenizer, [q for q, _ in QA])
    assert ids[0, : int(mask[0].sum())].tolist() == encode_prompt(tokenizer, request_messages(prompt=QA[0][0]))
    features = prompt_features(model, ids, mask, layer=1)
    assert features.shape == (len(QA), model.config.hidden_size) and torch.isfinite(features).all()
    alignment = alignment_for(model)
    if model.config.tie_word_embeddings:  # W_out = W_in: the ridge map is the identity up to λ
        assert torch.allclose(alignment.matrix, torch.eye(model.config.hidden_size), atol=1e-3)
    else:
        assert not torch.allclose(alignment.matrix, torch.eye(model.config.hidden_size), atol=1e-1)
    result = run_latent(model, tokenizer, [QA[0][0]], Sampling(max_new_tokens=4), LatentConfig(latent_steps=2))
    assert result.cache_length > 0 and len(result.tokens[0]) <= 4
