"""The LatentMAS pipeline, faithful to the paper's reference code: Planner → Critic → Refiner think in
latent space and only the Judger decodes text.

Each non-final agent prefills its role prompt on top of the shared KV cache, then for m steps takes
the last layer's hidden state at the last position, realigns it to the input-embedding space
(`alignment.realign`) and feeds it back as `inputs_embeds`. The KV cache — prompts plus latent
thoughts — is the working memory handed to the next agent, and the Judger decodes its answer on top
of all of it (the part the project's predecessor skipped). Options mirror the reference: keep the
whole cache, only the last agent's positions, or only the latent positions; with m = 0 the Judger
reads no cache at all."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from latentmas.services.agent_prompts import DEFAULT_PROMPTS, AnswerFormat, PromptSet
from latentmas.services.alignment import DEFAULT_LAMBDA, Alignment, alignment_for, realign
from latentmas.services.detokenize import complete_text
from latentmas.services.engine_work import AdapterScope, Program, WorkItem, drive
from latentmas.services.text_pipeline import (
    DEFAULT_AGENTS,
    Agent,
    AgentTrace,
    Mode,
    PipelineKind,
    PipelineResult,
    Sampling,
    TokenCallback,
    WorkingMemory,
    decode_program,
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
Positions = Literal["reference", "continuous"]
DEFAULT_REALIGN = False
"""Off, as in the reference (a per-task switch there, `--latent_space_realign`): the norm rescaling alone
keeps latent inputs in range, and on a tied-embedding base (SmolLM2) W_a is the identity up to λ anyway."""


@dataclass(frozen=True)
class LatentConfig:
    """`positions` only matters with `keep` != `all`: `reference` numbers the positions after a truncated
    cache from the kept length (what the reference's HF path does), `continuous` keeps counting from
    where the dropped positions ended (the cached keys' rotations stay consistent)."""

    latent_steps: int = 8
    mode: Mode = "sequential"
    keep: CacheKeep = "all"
    realign: bool = DEFAULT_REALIGN
    lam: float = DEFAULT_LAMBDA
    positions: Positions = "reference"

    def __post_init__(self) -> None:
        if self.latent_steps < 0:
            raise ValueError("latent_steps must be >= 0")
        if not self.lam > 0:
            raise ValueError("realign_lambda must be > 0")


def rollout_program(
    model: Any,
    memory: WorkingMemory,
    last_hidden: torch.Tensor,
    steps: int,
    alignment: Alignment,
    record: list[torch.Tensor] | None = None,
    agent: Agent | None = None,
) -> Program[tuple[WorkingMemory, torch.Tensor]]:
    """m latent steps: realigned last hidden state in, one new cached position per step out. The LM
    head never runs: only the decoder's last hidden state is needed."""
    batch = last_hidden.shape[0]
    ones = torch.ones((batch, 1), dtype=torch.long, device=last_hidden.device)
    for _ in range(steps):
        embeds = realign(last_hidden, alignment)[:, None, :]
        if record is not None:
            record.append(embeds)
        yield WorkItem("latent_step", agent.name if agent else "", agent.adapter if agent else None, batch, 1, False)
        with torch.no_grad():
            outputs, memory = forward_chunk(model, memory, ones, inputs_embeds=embeds, head=False)
        last_hidden = outputs.last_hidden_state[:, -1, :]
    return memory, last_hidden


def latent_rollout(
    model: Any,
    memory: WorkingMemory,
    last_hidden: torch.Tensor,
    steps: int,
    alignment: Alignment,
    record: list[torch.Tensor] | None = None,
) -> tuple[WorkingMemory, torch.Tensor]:
    """`rollout_program` run to its end by a caller that owns the model."""
    return drive(rollout_program(model, memory, last_hidden, steps, alignment, record), no_adapter_scope)


def truncate(memory: WorkingMemory, added: int, config: LatentConfig) -> WorkingMemory:
    """The cache handed to the next agent: all of it, the positions the agent just added
    (`last_agent`, the reference's `sequential_info_only`) or only its latent positions (`latent_only`)."""
    renumber = config.positions == "reference"
    if config.keep == "last_agent":
        return memory.keep_last(added, renumber)
    if config.keep == "latent_only":
        return memory.keep_last(config.latent_steps, renumber)
    return memory


def think_program(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    config: LatentConfig,
    agents: Sequence[Agent],
    answer: AnswerFormat = "free",
    segments: list[torch.Tensor] | None = None,
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> Program[tuple[WorkingMemory, list[AgentTrace]]]:
    """The thinking agents: each prefills its prompt on the shared cache and adds m latent positions.
    With m = 0 the Judger reads no cache (as in the reference), so the thinkers are skipped."""
    device = model_device(model)
    memory = WorkingMemory.empty(len(questions), device)
    traces: list[AgentTrace] = []
    if config.latent_steps == 0:
        return memory, [AgentTrace(a.name, a.role, a.adapter) for a in agents]
    alignment = alignment_for(model, config.lam, config.realign)
    embed_tokens = model.get_input_embeddings()
    for agent in agents:
        rendered = [
            render_chat(tokenizer, latent_messages(agent.role, q, config.mode, answer, prompts)) for q in questions
        ]
        ids, mask = encode(tokenizer, rendered, device)
        before = memory.length
        yield WorkItem("prefill", agent.name, agent.adapter, len(questions), int(ids.shape[1]), False)
        with torch.no_grad():
            outputs, memory = forward_chunk(model, memory, mask, input_ids=ids, head=False)
            if segments is not None:
                segments.append(embed_tokens(ids))
        hidden = outputs.last_hidden_state[:, -1, :]
        memory, _ = yield from rollout_program(model, memory, hidden, config.latent_steps, alignment, segments, agent)
        kv_bytes = memory.nbytes
        memory = truncate(memory, memory.length - before, config)
        trace = AgentTrace(agent.name, agent.role, agent.adapter, config.latent_steps, int(mask.sum()))
        trace.forward_passes, trace.kv_bytes = 1 + config.latent_steps, kv_bytes
        trace.row_prompt_tokens = mask.sum(dim=1).tolist()
        traces.append(trace)
    return memory, traces


def latent_program(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    sampling: Sampling,
    config: LatentConfig = LatentConfig(),
    agents: Sequence[Agent] = DEFAULT_AGENTS,
    on_token: TokenCallback | None = None,
    record: bool = False,
    answer: AnswerFormat = "free",
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> Program[PipelineResult]:
    """The latent pipeline on a batch of questions as an engine program (see `engine_work`). With
    `record`, the result keeps every input segment (prompt embeddings and latent vectors, in cache
    order) so tests can replay them uncached."""
    if len(agents) < 1:
        raise ValueError("the latent pipeline needs at least the Judger")
    started = time.perf_counter()
    device = model_device(model)
    segments: list[torch.Tensor] = []
    memory, traces = yield from think_program(
        model, tokenizer, questions, config, agents[:-1], answer, segments if record else None, prompts
    )
    judger = agents[-1]
    rendered = [
        render_chat(tokenizer, latent_messages(judger.role, q, config.mode, answer, prompts)) for q in questions
    ]
    ids, mask = encode(tokenizer, rendered, device)
    if record:
        with torch.no_grad():
            segments.append(model.get_input_embeddings()(ids))
    decoded = yield from decode_program(
        model, tokenizer, memory, ids, mask, sampling, on_token, judger.name, judger.adapter
    )
    texts = [complete_text(tokenizer, row).strip() for row in decoded.tokens]
    judge_trace = AgentTrace(judger.name, judger.role, judger.adapter, 0, int(mask.sum()))
    judge_trace.emitted_tokens = sum(len(t) for t in decoded.tokens)
    judge_trace.output = texts[0] if len(texts) == 1 else ""
    judge_trace.forward_passes, judge_trace.kv_bytes = decoded.forward_passes, decoded.memory.nbytes
    judge_trace.row_prompt_tokens = mask.sum(dim=1).tolist()
    judge_trace.row_emitted_tokens = [len(t) for t in decoded.tokens]
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
    answer: AnswerFormat = "free",
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> PipelineResult:
    """`latent_program` run to its end by a caller that owns the model, each agent's forward passes
    under its adapter."""
    program = latent_program(model, tokenizer, questions, sampling, config, agents, on_token, record, answer, prompts)
    return drive(program, adapter_scope)


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
    on_token: TokenCallback | None = None,
    answer: AnswerFormat = "free",
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> PipelineResult:
    """The pipeline a request selected: `latent`, `text` (baseline, in `latent.mode`) or `single`."""
    if kind == "latent":
        return run_latent(
            model,
            tokenizer,
            questions,
            sampling,
            latent,
            with_adapter(agents, adapter),
            adapter_scope,
            on_token,
            answer=answer,
            prompts=prompts,
        )
    if kind == "text":
        return run_text(
            model,
            tokenizer,
            questions,
            sampling,
            with_adapter(agents, adapter),
            adapter_scope,
            on_token,
            mode=latent.mode,
            answer=answer,
            prompts=prompts,
        )
    if kind == "single":
        return run_single(model, tokenizer, questions, sampling, adapter, adapter_scope, on_token, answer)
    raise ValueError(f"unknown pipeline {kind!r}; use latent, text or single")
