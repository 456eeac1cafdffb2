"""Router features stop the forward pass at the feature layer and still equal transformers' hidden_states."""

from __future__ import annotations

import pytest
import torch
from latentmas.training.router_model import prompt_features
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_truncated_features_equal_the_full_forward(model: LlamaForCausalLM, layer: int) -> None:
    ids = torch.randint(0, 128, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
    expected = (full * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    torch.testing.assert_close(prompt_features(model, ids, mask, layer), expected, rtol=1e-5, atol=1e-6)


def test_later_blocks_and_the_lm_head_do_not_run(model: LlamaForCausalLM) -> None:
    ran: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name, module in [("block2", model.model.layers[2]), ("lm_head", model.lm_head)]
    ]
    try:
        prompt_features(model, torch.randint(0, 128, (1, 4)), torch.ones(1, 4, dtype=torch.long), 1)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == []
    with pytest.raises(ValueError, match=r"out of range 0\.\.3"):
        prompt_features(model, torch.randint(0, 128, (1, 4)), torch.ones(1, 4, dtype=torch.long), 4)
