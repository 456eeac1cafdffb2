"""The LatentMAS pipeline, faithful to the paper's reference code: Planner → Critic → Refiner think in
latent space and only the Judger decodes text.

Each non-final agent prefills its role prompt on top of the shared KV cache, then for m steps takes
the last layer's hidden state at the last position, realigns it to the input-embedding space
(`alignment.realign`) and feeds it back as `inputs_embeds`. The KV cache — prompts plus latent
thoughts — is the working memory handed to the next agent, and the Judger decodes its answer on top
of all of it (the part the project's predecessor skipped). Options mirror the reference: keep the
whole cache, only the last agent's positions, or only the latent positions."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from latentmas.services.alignment import DEFAULT_LAMBDA, Alignment, alignment_for, realign
from latentmas.services.detokenize import complete_text
from latentmas.services.text_pipeline import (
    DEFAULT_AGENTS,
    AdapterScope,
    Agent,
    AgentTrace,
    Mode,
    PipelineKind,
    PipelineResult,
    Sampling,
    TokenCallback,
    WorkingMemory,
    decode,
    encode,
    forward_chunk,
    latent_messages,
    model_device,
    no_adapter_scope,
    render_chat,
    run_single,
    run_text,
)

CacheKeep = Literal["all", "last_agent", "latent_only"]


@dataclass(frozen=True)
class LatentConfig:
    latent_steps: int = 8
    mode: Mode = "sequential"
    keep: CacheKeep = "all"
    realign: bool = True
    lam: float = DEFAULT_LAMBDA

    def __post_init__(self) -> None:
        if self.latent_steps < 0:
            raise ValueError("latent_steps must be >= 0")
        if self.keep == "latent_only" and self.latent_steps == 0:
            raise ValueError("keep='latent_only' needs latent_steps >= 1")


@torch.no_grad()
def latent_rollout(
    model: Any,
    memory: WorkingMemory,
    last_hidden: torch.Tensor,
    steps: int,
    alignment: Alignment,
    record: list[torch.Tensor] | None = None,
) -> tuple[WorkingMemory, torch.Tensor]:
    """m latent steps: realigned last hidden state in, one new cached position per step out."""
    batch = last_hidden.shape[0]
    ones = torch.ones((batch, 1), dtype=torch.long, device=last_hidden.device)
    for _ in range(steps):
        embeds = realign(last_hidden, alignment)[:, None, :]
        if record is not None:
            record.append(embeds)
        outputs, memory = forward_chunk(model, memory, ones, inputs_embeds=embeds)
        last_hidden = outputs.hidden_states[-1][:, -1, :]
    return memory, last_hidden


@torch.no_grad()
def run_latent(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    sampling: Sampling,
    config: LatentConfig = LatentConfig(),
    agents: Sequence[Agent] = DEFAULT_AGENTS,
    adapter_scope: AdapterScope = no_adapter_scope,
    on_token: TokenCallback | None = None,
    record: bool = False,
) -> PipelineResult:
    """Runs the agents on a batch of questions. With `record`, the result keeps every input segment
    (prompt embeddings and latent vectors, in cache order) so tests can replay them uncached."""
    if len(agents) < 1:
        raise ValueError("the latent pipeline needs at least the Judger")
    started = time.perf_counter()
    device = model_device(model)
    alignment = alignment_for(model, config.lam, config.realign)
    embed_tokens = model.get_input_embeddings()
    memory = WorkingMemory.empty(len(questions), device)
    segments: list[torch.Tensor] = []
    traces: list[AgentTrace] = []
    for agent in agents[:-1]:
        prompts = [render_chat(tokenizer, latent_messages(agent.role, q, config.mode)) for q in questions]
        ids, mask = encode(tokenizer, prompts, device)
        before = memory.length
        with adapter_scope(agent.adapter, len(questions)):
            outputs, memory = forward_chunk(model, memory, mask, input_ids=ids)
            if record:
                segments.append(embed_tokens(ids))
            memory, _ = latent_rollout(
                model,
                memory,
                outputs.hidden_states[-1][:, -1, :],
                config.latent_steps,
                alignment,
                segments if record else None,
            )
        if config.keep == "last_agent":
            memory = memory.keep_last(memory.length - before)
        elif config.keep == "latent_only":
            memory = memory.keep_last(config.latent_steps)
        traces.append(AgentTrace(agent.name, agent.role, agent.adapter, config.latent_steps, int(mask.sum())))
    judger = agents[-1]
    prompts = [render_chat(tokenizer, latent_messages(judger.role, q, config.mode)) for q in questions]
    ids, mask = encode(tokenizer, prompts, device)
    if record:
        segments.append(embed_tokens(ids))
    with adapter_scope(judger.adapter, len(questions)):
        decoded = decode(model, tokenizer, memory, ids, mask, sampling, on_token)
    texts = [complete_text(tokenizer, row).strip() for row in decoded.tokens]
    judge_trace = AgentTrace(judger.name, judger.role, judger.adapter, 0, int(mask.sum()))
    judge_trace.emitted_tokens = sum(len(t) for t in decoded.tokens)
    judge_trace.output = texts[0] if len(texts) == 1 else ""
    return PipelineResult(
        "latent",
        texts,
        decoded.tokens,
        [*traces, judge_trace],
        cache_length=decoded.memory.length,
        seconds=time.perf_counter() - started,
        first_logits=decoded.first_logits,
        segments=segments,
    )


def with_adapter(agents: Sequence[Agent], adapter: str | None) -> list[Agent]:
    """Agents without their own expert think with the request's (explicit or routed) adapter."""
    return [replace(a, adapter=a.adapter or adapter) for a in agents]


def run_pipeline(
    kind: PipelineKind,
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    sampling: Sampling,
    *,
    latent: LatentConfig = LatentConfig(),
    agents: Sequence[Agent] = DEFAULT_AGENTS,
    adapter: str | None = None,
    adapter_scope: AdapterScope = no_adapter_scope,
    agent_sampling: Sampling | None = None,
    on_token: TokenCallback | None = None,
) -> PipelineResult:
    """The pipeline a request selected: `latent`, `text` (baseline) or `single`."""
    if kind == "latent":
        return run_latent(
            model, tokenizer, questions, sampling, latent, with_adapter(agents, adapter), adapter_scope, on_token
        )
    if kind == "text":
        return run_text(
            model,
            tokenizer,
            questions,
            sampling,
            agent_sampling,
            with_adapter(agents, adapter),
            adapter_scope,
            on_token,
        )
    if kind == "single":
        return run_single(model, tokenizer, questions, sampling, adapter, adapter_scope, on_token)
    raise ValueError(f"unknown pipeline {kind!r}; use latent, text or single")
