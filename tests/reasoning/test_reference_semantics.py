"""The pipeline against an independent re-implementation of the LatentMAS reference code's HF path
(Gen-Verse/LatentMAS `models.py` generate_latent_batch / `methods/latent_mas.py` run_batch).

The re-implementation below uses only the transformers model: its own ridge solve, its own latent loop
with all-ones masks and positions taken from the cache length (what the reference gets by passing no
position ids), its own cache truncation, and the reference's rule that with m = 0 the Judger decodes
without any cache. It imports nothing of the project's alignment or forward helpers, only the prompt
text, so both sides read identical tokens."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from latentmas.services.latent_pipeline import LatentConfig, run_latent
from latentmas.services.text_pipeline import DEFAULT_AGENTS, Sampling, latent_messages, render_chat
from transformers import DynamicCache

pytestmark = pytest.mark.reasoning
TOL = 1e-4
QUESTION = "Which index should the portfolio track when rates rise?"
DECODE = 4


def _past_len(past: Any) -> int:
    return 0 if past is None else int(past.get_seq_length())


def _keep_last(past: Any, keep: int) -> Any:
    """The reference's `_truncate_past`: the last `keep` positions of every layer, None for keep <= 0."""
    if past is None or keep <= 0:
        return None
    trimmed = DynamicCache()
    for index, layer in enumerate(past.layers):
        trimmed.update(layer.keys[..., -keep:, :], layer.values[..., -keep:, :], index)
    return trimmed


def _matrix(model: Any, realign: bool, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    w_in = model.get_input_embeddings().weight.detach().float()
    w_out = model.get_output_embeddings().weight.detach().float()
    target = w_in.norm(dim=1).mean()
    if not realign:
        return torch.eye(w_in.shape[1]), target
    gram = w_out.T @ w_out + lam * torch.eye(w_out.shape[1])
    return torch.linalg.solve(gram, w_out.T @ w_in), target


def _forward(model: Any, past: Any, **inputs: torch.Tensor) -> Any:
    width = next(iter(inputs.values())).shape[1]
    mask = torch.ones((1, _past_len(past) + width), dtype=torch.long)
    return model(attention_mask=mask, past_key_values=past, use_cache=True, output_hidden_states=True, **inputs)


def _ids(tokenizer: Any, role: str, mode: str) -> torch.Tensor:
    text = render_chat(tokenizer, latent_messages(role, QUESTION, mode))
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def reference_judger(
    model: Any, tokenizer: Any, m: int, keep: str, realign: bool, lam: float = 1e-5, mode: str = "sequential"
) -> tuple[torch.Tensor, list[int]]:
    """The Judger's first logits and its greedy tokens, as the reference computes them."""
    matrix, target = _matrix(model, realign, lam)
    past = None
    for role in ("planner", "critic", "refiner"):
        before = _past_len(past)
        out = _forward(model, past, input_ids=_ids(tokenizer, role, mode))
        past, hidden = out.past_key_values, out.hidden_states[-1][:, -1, :]
        for _ in range(m):
            aligned = hidden.float() @ matrix
            aligned = aligned * (target / aligned.norm(dim=-1, keepdim=True).clamp_min(1e-6))
            out = _forward(model, past, inputs_embeds=aligned[:, None, :].to(hidden.dtype))
            past, hidden = out.past_key_values, out.hidden_states[-1][:, -1, :]
        if keep != "all":
            past = _keep_last(past, m if keep == "latent_only" else _past_len(past) - before)
    past = past if m > 0 else None
    out = _forward(model, past, input_ids=_ids(tokenizer, "judger", mode))
    first = out.logits[:, -1, :].float()
    tokens: list[int] = []
    logits = first
    for _ in range(DECODE):
        token = int(logits.argmax(dim=-1))
        if token == tokenizer.eos_token_id:
            break
        tokens.append(token)
        out = _forward(model, out.past_key_values, input_ids=torch.tensor([[token]]))
        logits = out.logits[:, -1, :].float()
    return first, tokens


def pipeline_judger(model: Any, tokenizer: Any, config: LatentConfig) -> tuple[torch.Tensor, list[int]]:
    result = run_latent(model, tokenizer, [QUESTION], Sampling(max_new_tokens=DECODE), config, DEFAULT_AGENTS)
    assert result.first_logits is not None
    return result.first_logits, result.tokens[0]


@pytest.mark.parametrize("realign", [False, True])
@pytest.mark.parametrize("keep", ["all", "last_agent", "latent_only"])
@pytest.mark.parametrize("m", [0, 4, 16])
def test_pipeline_matches_the_reference(tiny_lm, m, keep, realign):
    model, tokenizer = tiny_lm
    expected, expected_tokens = reference_judger(model, tokenizer, m, keep, realign)
    got, tokens = pipeline_judger(model, tokenizer, LatentConfig(m, keep=keep, realign=realign))
    assert (got - expected).abs().max().item() <= TOL
    assert tokens == expected_tokens


def test_hierarchical_mode_and_lambda_match_the_reference(tiny_lm):
    model, tokenizer = tiny_lm
    expected, _ = reference_judger(model, tokenizer, 4, "all", True, lam=1e-1, mode="hierarchical")
    got, _ = pipeline_judger(model, tokenizer, LatentConfig(4, mode="hierarchical", realign=True, lam=1e-1))
    assert (got - expected).abs().max().item() <= TOL
    # λ is really used: a different λ gives different logits on this untied model.
    other, _ = pipeline_judger(model, tokenizer, LatentConfig(4, mode="hierarchical", realign=True, lam=1e-5))
    assert (other - got).abs().max().item() > 1e-3


@pytest.mark.parametrize("keep", ["last_agent", "latent_only"])
def test_continuous_positions_are_a_named_deviation(tiny_lm, keep):
    """`positions="continuous"` keeps counting after a truncated cache, where the reference renumbers
    from the kept length: different position ids for the Judger, hence different logits, and the same
    result as the reference when nothing is dropped."""
    model, tokenizer = tiny_lm
    starts: list[int] = []

    def spy(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:
            starts.append(int(kwargs["position_ids"][0, 0]))

    handle = model.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        continuous, _ = pipeline_judger(model, tokenizer, LatentConfig(4, keep=keep, positions="continuous"))
        renumbered, _ = pipeline_judger(model, tokenizer, LatentConfig(4, keep=keep, positions="reference"))
    finally:
        handle.remove()
    prompts = [int(_ids(tokenizer, role, "sequential").shape[1]) for role in ("planner", "critic", "refiner")]
    kept = 4 if keep == "latent_only" else prompts[-1] + 4
    # planner, critic, refiner, Judger prefills, for each of the two runs
    assert starts[3] == sum(prompts) + 3 * 4 and starts[7] == kept
    assert (continuous - renumbered).abs().max().item() > TOL
    whole, _ = reference_judger(model, tokenizer, 4, "all", False)
    same, _ = pipeline_judger(model, tokenizer, LatentConfig(4, keep="all", positions="continuous"))
    assert (same - whole).abs().max().item() <= TOL


def test_m0_judger_reads_no_cache(tiny_lm):
    """With m = 0 the reference's Judger decodes on its own prompt only, whatever the cache mode."""
    model, tokenizer = tiny_lm
    alone = model(input_ids=_ids(tokenizer, "judger", "sequential")).logits[:, -1, :].float()
    result = run_latent(model, tokenizer, [QUESTION], Sampling(max_new_tokens=1), LatentConfig(0))
    assert result.first_logits is not None
    assert (result.first_logits - alone).abs().max().item() <= TOL
    assert [a.forward_passes for a in result.agents[:-1]] == [0, 0, 0]
