"""The batched multi-LoRA layer against PEFT, adapter by adapter (the reference forward)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from latentmas.services.lora import (
    AdapterFormatError,
    Form,
    gathered_is_cheaper,
    install_multi_lora,
    load_peft_adapter,
    plan_mixture,
)
from latentmas.training.architectures import discover_target_modules
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serving.conftest import Toy

pytestmark = pytest.mark.serving
# float32 on CPU: the batched path sums the same products in a different order than PEFT.
TOLERANCE = 1e-4
FORMS: list[Form] = ["dense", "gathered"]


@pytest.mark.parametrize("form", FORMS)
def test_mixed_adapter_batch_matches_each_adapters_own_peft_forward(toy: Toy, form: Form) -> None:
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    names = ["seed1", "seed2", "rank8-attn", "seed3"]
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=4, max_rank=8)
    served.form = form
    for slot, name in enumerate(names):
        served.write_slot(slot, load_peft_adapter(toy.adapters[name], served.shapes))
    prompts = ["what is the stock price", "the judge and the court", "hello", "code error in the loop", "a b c"]
    # rows: one per adapter (ranks 4 and 8, different targets) and a base row; left padding differs per row
    mixes: list[list[tuple[int, float]]] = [[(0, 1.0)], [(1, 1.0)], [(2, 1.0)], [(3, 1.0)], []]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad(), served.mixture(mixes):
        batched = model(**encoded).logits

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


def _peft_mixture(toy: Toy, gates: list[tuple[str, float]], encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's own forward with every adapter of `gates` active at once, each one's LoRA scale multiplied by
    its gate weight (`LoraLayer.set_scale`); the bare base when `gates` is empty."""
    from peft.tuners.lora.layer import LoraLayer

    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    if gates:
        reference = PeftModel.from_pretrained(model, toy.adapters[gates[0][0]], adapter_name="m0")
        for i, (name, _) in enumerate(gates[1:], start=1):
            reference.load_adapter(toy.adapters[name], adapter_name=f"m{i}")
        reference.base_model.set_adapter([f"m{i}" for i in range(len(gates))])
        for module in reference.modules():
            if isinstance(module, LoraLayer):
                for i, (_, gate) in enumerate(gates):
                    if f"m{i}" in module.lora_A:
                        module.set_scale(f"m{i}", gate)
        model = reference.eval()
    with torch.no_grad():
        logits: torch.Tensor = model(**encoded).logits[0]
    return logits


@pytest.mark.parametrize("form", FORMS)
def test_top1_top2_and_soft_rows_in_one_batch_match_peft_at_their_gate_scales(toy: Toy, form: Form) -> None:
    """One batch, five adapters resident (ranks 4 and 8, different targets): a top-1 row, two top-2 rows, a
    soft row over three adapters, a base row and another top-1 row; each row equals PEFT with exactly its
    adapters active, each scaled by its gate weight. In both forms of the LoRA term (dense over the used
    slots; gathered per row)."""
    names = ["seed1", "seed2", "rank8-attn", "seed3", "seed4"]
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=6, max_rank=64)
    served.form = form
    for slot, name in enumerate(names):
        served.write_slot(slot, load_peft_adapter(toy.adapters[name], served.shapes))
    assert served.rank == 8  # stacks as wide as the largest resident rank, not maxLoraRank
    rows: list[tuple[str, list[tuple[int, float]]]] = [
        ("what is the market price of the bond", [(0, 1.0)]),
        ("the judge and the court", [(1, 0.6), (2, 0.4)]),
        ("hello", [(3, 0.75), (0, 0.25)]),
        ("code error in the loop and the stack", [(4, 0.5), (2, 0.3), (1, 0.2)]),
        ("a b c", []),
        ("the bond yield", [(2, 1.0)]),
    ]
    encoded = tokenizer([p for p, _ in rows], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad(), served.mixture([m for _, m in rows]):
        batched = model(**encoded).logits
    for row, (prompt, mix) in enumerate(rows):
        single = tokenizer(prompt, return_tensors="pt")
        expected = _peft_mixture(toy, [(names[slot], gate) for slot, gate in mix], single)
        got = batched[row, -single["input_ids"].shape[1] :]
        assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0), f"row {row}: {(got - expected).abs().max()}"
        if len(mix) > 1:  # the mixture differs from its strongest adapter alone: gates really count
            alone = _peft_mixture(toy, [(names[mix[0][0]], 1.0)], single)
            assert (alone - expected).abs().max() > 1e-2


def test_the_dense_plan_reads_each_used_slot_once_and_leaves_base_rows_out() -> None:
    """The step's mixture has one column block per used slot (not per row and adapter), gate weights
    summed per slot, and lists only the rows that use an adapter; a batch of base rows has no plan."""
    mixes = [[(2, 0.7), (0, 0.3)], [], [(2, 1.0)], [(0, 0.5), (0, 0.5)]]
    plan = plan_mixture(mixes, rank=2, dtype=torch.float32, device=torch.device("cpu"))
    assert plan is not None and plan.rows is not None
    assert plan.rows.tolist() == [0, 2, 3]
    expected = [[0.3, 0.3, 0.0, 0.0, 0.7, 0.7], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    assert torch.equal(plan.scale, torch.tensor(expected))
    assert plan_mixture([[], []], rank=2, dtype=torch.float32, device=torch.device("cpu")) is None
    everyone = plan_mixture([[(1, 1.0)], [(0, 1.0)]], rank=4, dtype=torch.float32, device=torch.device("cpu"))
    assert everyone is not None and everyone.rows is None and everyone.scale.shape == (2, 8)


def test_the_gathered_plan_lists_each_rows_own_slots_and_is_chosen_where_arithmetic_decides() -> None:
    """The gathered form holds each adapter row's own (slot, gate) pairs (padded with gate 0); "auto" picks it
    on a CPU once the dense term's rows x used slots exceeds 8 x the rows' pairs, and never on CUDA."""
    cpu = torch.device("cpu")
    mixes = [[(2, 0.7), (0, 0.3)], [], [(5, 1.0)]]
    plan = plan_mixture(mixes, rank=2, dtype=torch.float32, device=cpu, form="gathered")
    assert plan is not None and plan.slots is not None and plan.rows is not None
    assert plan.slots.tolist() == [[2, 0], [5, 0]] and plan.rows.tolist() == [0, 2]
    assert torch.equal(plan.scale, torch.tensor([[0.7, 0.7, 0.3, 0.3], [1.0, 1.0, 0.0, 0.0]]))
    assert (narrow := plan_mixture(mixes, rank=2, dtype=torch.float32, device=cpu)) and narrow.slots is None
    spread = [[(16 * i, 1.0)] for i in range(4)]  # 8 x 4 pairs < 4 rows x 49 slots
    auto = plan_mixture(spread, rank=2, dtype=torch.float32, device=cpu)
    assert auto is not None and auto.slots is not None
    shared = plan_mixture([[(0, 1.0)]] * 4, rank=2, dtype=torch.float32, device=cpu)  # one slot: dense
    assert shared is not None and shared.slots is None
    assert not gathered_is_cheaper(torch.device("cuda"), pairs=64, rows=64, width=64)
    static = plan_mixture(mixes, rank=2, dtype=torch.float32, device=cpu, static=8, form="gathered")
    assert static is not None and static.slots is None and static.rows is None and static.scale.shape == (3, 16)


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
    # the per-row [batch, K] form that pipelines set directly is turned into the same dense plan
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
