"""The batched multi-LoRA layer against PEFT, adapter by adapter (the reference forward)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from latentmas.services.lora import AdapterFormatError, install_multi_lora, load_peft_adapter
from latentmas.training.architectures import discover_target_modules
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serving.conftest import Toy

pytestmark = pytest.mark.serving
# float32 on CPU: the batched path sums the same products in a different order than PEFT.
TOLERANCE = 1e-4


def test_mixed_adapter_batch_matches_each_adapters_own_peft_forward(toy: Toy) -> None:
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    names = ["seed1", "seed2", "rank8-attn", "seed3"]
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=4, max_rank=8)
    for slot, name in enumerate(names):
        served.write_slot(slot, load_peft_adapter(toy.adapters[name], served.shapes))
    prompts = ["what is the stock price", "the judge and the court", "hello", "code error in the loop", "a b c"]
    # rows: one per adapter (ranks 4 and 8, different targets) and a base row; left padding differs per row
    mixes: list[list[tuple[int, float]]] = [[(0, 1.0)], [(1, 1.0)], [(2, 1.0)], [(3, 1.0)], []]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    width = max(len(m) for m in mixes)
    served.context.indices = torch.tensor([[s for s, _ in m] + [0] * (width - len(m)) for m in mixes])
    served.context.weights = torch.tensor([[w for _, w in m] + [0.0] * (width - len(m)) for m in mixes])
    with torch.no_grad():
        batched = model(**encoded).logits
    served.context.indices = served.context.weights = None

    for row, (prompt, mix) in enumerate(zip(prompts, mixes, strict=True)):
        reference_model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
        if mix:
            reference_model = PeftModel.from_pretrained(reference_model, toy.adapters[names[mix[0][0]]]).eval()
        single = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            reference = reference_model(**single).logits[0]
        length = single["input_ids"].shape[1]
        got = batched[row, -length:]
        assert torch.allclose(got, reference, atol=TOLERANCE, rtol=0), f"row {row}: {(got - reference).abs().max()}"
        if mix:  # the adapter really changes the output, so equality above is not vacuous
            base_logits = AutoModelForCausalLM.from_pretrained(toy.base).eval()(**single).logits[0]
            assert (base_logits - reference).abs().max() > 1e-2


def test_adapter_that_does_not_fit_the_base_is_refused(toy: Toy, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(toy.base)
    served = install_multi_lora(model, discover_target_modules(model), slots=2, max_rank=8)
    broken = tmp_path / "broken"
    shutil.copytree(toy.adapters["seed1"], broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="do not fit base"):
        load_peft_adapter(broken, served.shapes)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterFormatError, match="unreadable"):
        load_peft_adapter(broken, served.shapes)


def test_soft_mixture_row_matches_peft_with_both_adapters_active_at_gate_scales(toy: Toy) -> None:
    """Soft routing: a row with gates 0.7/0.3 over two adapters equals PEFT with both adapters active and
    each one's LoRA scale multiplied by its gate (`LoraLayer.set_scale`)."""
    from peft.tuners.lora.layer import LoraLayer

    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=3, max_rank=8)
    served.write_slot(1, load_peft_adapter(toy.adapters["seed1"], served.shapes))
    served.write_slot(2, load_peft_adapter(toy.adapters["rank8-attn"], served.shapes))
    encoded = tokenizer(["the market price of the bond"], return_tensors="pt")
    served.context.indices = torch.tensor([[1, 2]])
    served.context.weights = torch.tensor([[0.7, 0.3]])
    with torch.no_grad():
        mixed = model(**encoded).logits[0]
    served.context.indices = served.context.weights = None

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(toy.base), toy.adapters["seed1"], adapter_name="a"
    )
    reference.load_adapter(toy.adapters["rank8-attn"], adapter_name="b")
    reference.base_model.set_adapter(["a", "b"])
    for module in reference.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("a", 0.7)
            module.set_scale("b", 0.3)
    with torch.no_grad():
        expected = reference.eval()(**encoded).logits[0]
    assert torch.allclose(mixed, expected, atol=TOLERANCE, rtol=0), (mixed - expected).abs().max()
