"""The LatentMAS pipeline is what the paper describes: realignment solves its normal equations, the
cached latent rollout equals one uncached forward, the Judger reads the whole transferred memory,
only the Judger emits tokens, and batching with padding changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from latentmas.services.alignment import alignment_for, realign
from latentmas.services.latent_pipeline import LatentConfig, latent_rollout, run_latent, run_pipeline
from latentmas.services.text_pipeline import (
    Agent,
    Sampling,
    WorkingMemory,
    encode,
    forward_chunk,
    latent_messages,
    render_chat,
)

pytestmark = pytest.mark.reasoning
TOL = 1e-4


def test_alignment_solves_ridge_normal_equations(tiny_lm):
    model, _ = tiny_lm
    alignment = alignment_for(model, lam=1e-3)
    w_in = model.get_input_embeddings().weight.detach().double()
    w_out = model.get_output_embeddings().weight.detach().double()
    w_a = alignment.matrix.double()
    eye = torch.eye(w_a.shape[0], dtype=torch.float64)
    lhs = (w_out.T @ w_out + 1e-3 * eye) @ w_a
    rhs = w_out.T @ w_in
    assert alignment.matrix.dtype == torch.float32
    assert ((lhs - rhs).norm() / rhs.norm()).item() < 1e-5

    def objective(matrix: torch.Tensor) -> float:
        return ((w_out @ matrix - w_in).norm() ** 2 + 1e-3 * matrix.norm() ** 2).item()

    torch.manual_seed(1)
    best = objective(w_a)
    for _ in range(3):
        assert objective(w_a + 1e-3 * torch.randn_like(w_a)) > best
    assert alignment_for(model, lam=1e-3) is alignment  # computed once
    hidden = torch.randn(3, w_a.shape[0])
    norms = realign(hidden, alignment).norm(dim=-1)
    assert torch.allclose(norms, w_in.float().norm(dim=1).mean().expand(3), atol=1e-4)


def test_cached_latent_rollout_equals_one_uncached_forward(tiny_lm):
    model, tokenizer = tiny_lm
    prompt = render_chat(tokenizer, latent_messages("planner", "What drives bond returns?"))
    ids, mask = encode(tokenizer, [prompt], torch.device("cpu"))
    with torch.no_grad():
        outputs, memory = forward_chunk(model, WorkingMemory.empty(1, ids.device), mask, input_ids=ids, head=False)
        fed: list[torch.Tensor] = []
        memory, last_hidden = latent_rollout(
            model, memory, outputs.last_hidden_state[:, -1, :], 5, alignment_for(model, realign=True), fed
        )
        sequence = torch.cat([model.get_input_embeddings()(ids), *fed], dim=1)
        reference = model(inputs_embeds=sequence, use_cache=True, output_hidden_states=True)
    assert memory.length == ids.shape[1] + 5 == sequence.shape[1]
    assert (reference.hidden_states[-1][:, -1, :] - last_hidden).abs().max().item() <= TOL
    for (k_cached, v_cached, *_), (k_ref, v_ref, *_) in zip(memory.cache, reference.past_key_values, strict=True):
        assert (k_cached - k_ref).abs().max().item() <= TOL
        assert (v_cached - v_ref).abs().max().item() <= TOL
    # Each latent input is the realigned hidden state of the position before it.
    realigned = realign(reference.hidden_states[-1][:, ids.shape[1] - 1 : -1, :], alignment_for(model, realign=True))
    assert (realigned - torch.cat(fed, dim=1)).abs().max().item() <= TOL


@pytest.mark.parametrize("mode", ["sequential", "hierarchical"])
def test_judger_logits_come_from_the_transferred_cache(tiny_lm, mode):
    model, tokenizer = tiny_lm
    question = "Which index should the portfolio track?"
    agents = [
        Agent("Planner", "planner", "finance"),
        Agent("Critic", "critic"),
        Agent("Refiner", "refiner", "law"),
        Agent("Judger", "judger", "finance"),
    ]
    scopes: list[tuple[str | None, int]] = []

    @contextmanager
    def scope(adapter: str | None, batch: int) -> Iterator[None]:
        scopes.append((adapter, batch))
        yield

    result = run_latent(
        model,
        tokenizer,
        [question],
        Sampling(max_new_tokens=3),
        LatentConfig(latent_steps=4, mode=mode),
        agents=agents,
        adapter_scope=scope,
        record=True,
    )
    # Every forward pass runs under its agent's adapter, agent after agent.
    assert [s for i, s in enumerate(scopes) if i == 0 or scopes[i - 1] != s] == [
        ("finance", 1),
        (None, 1),
        ("law", 1),
        ("finance", 1),
    ]
    sequence = torch.cat(result.segments, dim=1)
    with torch.no_grad():
        reference = model(inputs_embeds=sequence).logits[:, -1, :]
    assert result.first_logits is not None
    assert (reference - result.first_logits).abs().max().item() <= TOL
    assert len(result.segments) == 4 + 3 * 4  # 4 prompts, 3 agents x 4 latent vectors
    # Without the memory the Judger would see something else: the transfer is real.
    judger_only = torch.cat(result.segments[-1:], dim=1)
    with torch.no_grad():
        alone = model(inputs_embeds=judger_only).logits[:, -1, :]
    assert (alone - result.first_logits).abs().max().item() > 1e-2
    assert result.summary()["latent_steps"] == 12
    assert result.cache_length >= sequence.shape[1]


def test_only_the_judger_emits_tokens(tiny_lm):
    model, tokenizer = tiny_lm
    calls: list[tuple[str, int]] = []

    def spy(_module, _args, kwargs):
        if kwargs.get("input_ids") is not None:
            calls.append(("ids", int(kwargs["input_ids"].shape[1])))
        else:
            calls.append(("latent", int(kwargs["inputs_embeds"].shape[1])))

    handle = model.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        result = run_latent(model, tokenizer, ["Summarise the plan."], Sampling(max_new_tokens=6), LatentConfig(2))
    finally:
        handle.remove()
    assert [a.emitted_tokens for a in result.agents[:-1]] == [0, 0, 0]
    assert all(a.output == "" for a in result.agents[:-1])
    judger = result.agents[-1]
    assert judger.emitted_tokens == len(result.tokens[0]) > 0
    assert result.generated_tokens == judger.emitted_tokens
    # prompt, 2 latent steps, for each of 3 thinkers; then the Judger's prompt and one-token decode steps
    expected_head = [
        ("ids", a.prompt_tokens) if i % 3 == 0 else ("latent", 1) for a in result.agents[:-1] for i in range(3)
    ]
    assert calls[:9] == expected_head
    assert calls[9] == ("ids", judger.prompt_tokens)
    assert all(call == ("ids", 1) for call in calls[10:])
    assert len(calls[10:]) in (judger.emitted_tokens - 1, judger.emitted_tokens)
    # The text baseline, by contrast, makes every agent write.
    text = run_pipeline("text", model, tokenizer, ["Summarise the plan."], Sampling(max_new_tokens=6))
    assert sum(a.emitted_tokens for a in text.agents[:-1]) > 0


@pytest.mark.parametrize("keep", ["all", "last_agent", "latent_only"])
def test_batching_and_padding_match_single_runs(tiny_lm, keep):
    model, tokenizer = tiny_lm
    questions = ["Why?", "What is the capital of France and which river crosses the city centre?"]
    config = LatentConfig(latent_steps=3, keep=keep)
    sampling = Sampling(max_new_tokens=5)
    batch = run_latent(model, tokenizer, questions, sampling, config)
    assert batch.first_logits is not None
    for row, question in enumerate(questions):
        alone = run_latent(model, tokenizer, [question], sampling, config)
        assert alone.first_logits is not None
        assert (alone.first_logits[0] - batch.first_logits[row]).abs().max().item() <= TOL
        assert alone.tokens[0] == batch.tokens[row]
    if keep == "latent_only":
        judger_prompt = batch.agents[-1].prompt_tokens
        assert batch.cache_length <= 3 + judger_prompt + sampling.max_new_tokens
