"""The agents, their prompts and the decoding machinery shared by every pipeline, plus the two
baselines: the text multi-agent pipeline (each agent writes text that the next one reads) and a
single agent.

Everything works on a plain HF causal LM + tokenizer (a PEFT model too), with an explicit working
memory (KV cache, attention mask, next position per row), so a batch of different-length prompts
behaves exactly like each prompt alone: padding is masked and positions count real tokens only."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from latentmas.chat import end_of_turn_ids, pad_token_id, render
from latentmas.prompts import request_messages
from latentmas.services.agent_prompts import (
    DEFAULT_PROMPTS,
    FORMAT_INSTRUCTIONS,
    AnswerFormat,
    Mode,
    PromptSet,
    Role,
    agent_messages,
    label_output,
)
from latentmas.services.detokenize import complete_text
from latentmas.services.engine_work import AdapterScope, Program, WorkItem, drive
from transformers import DynamicCache

PipelineKind = Literal["latent", "text", "single"]
TokenCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Agent:
    """One agent: its role prompt and, optionally, the expert adapter it thinks with."""

    name: str
    role: Role
    adapter: str | None = None


DEFAULT_AGENTS: tuple[Agent, ...] = (
    Agent("Planner", "planner"),
    Agent("Critic", "critic"),
    Agent("Refiner", "refiner"),
    Agent("Judger", "judger"),
)


def latent_messages(
    role: Role,
    question: str,
    mode: Mode = "sequential",
    answer: AnswerFormat = "free",
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> list[dict[str, str]]:
    """Chat messages for an agent of the latent pipeline (its context lives in the KV cache)."""
    return agent_messages("latent", mode, role, question, answer=answer, prompts=prompts)


def text_messages(
    role: Role,
    question: str,
    context: str = "",
    mode: Mode = "sequential",
    answer: AnswerFormat = "free",
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> list[dict[str, str]]:
    """Chat messages for an agent of the text pipeline (its context: the earlier agents' labelled outputs)."""
    return agent_messages("text", mode, role, question, context, answer, prompts)


def single_messages(question: str, answer: AnswerFormat = "free") -> list[dict[str, str]]:
    """One expert answering: the system prompt and layout its SFT data had; with a task answer format,
    the reference's single-agent instruction (reason step by step, answer in that format) is appended."""
    prompt = question if answer == "free" else f"{question}\n\n{FORMAT_INSTRUCTIONS[answer]}"
    return request_messages(prompt=prompt)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """An agent's prompt in the base's chat template (FALLBACK_TEMPLATE when it has none)."""
    return render(tokenizer, messages, add_generation_prompt=True)


def encode(tokenizer: Any, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, so the last column is every row's last real token."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(row) for row in ids)
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if not row:
            raise ValueError("an agent prompt encoded to zero tokens")
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return input_ids.to(device), mask.to(device)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@dataclass
class WorkingMemory:
    """The KV cache plus what is needed to extend it: the mask over every cached position (padding
    included) and the next position id of each row."""

    cache: DynamicCache
    mask: torch.Tensor
    next_pos: torch.Tensor

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> WorkingMemory:
        return cls(
            DynamicCache(),
            torch.zeros((batch, 0), dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v, *_ in self.cache)

    def keep_last(self, positions: int, renumber: bool = False) -> WorkingMemory:
        """Only the last `positions` cached positions (the reference code's cache truncation).

        `renumber=False`: later positions keep counting from where they were, so relative distances stay
        those the cached keys were rotated with. `renumber=True` is what the reference does: the next
        position is the number of cached (real) positions, as if the kept ones had been the first."""
        if positions >= self.length:
            return self
        start = self.length - positions
        mask = self.mask[:, start:]
        next_pos = mask.sum(dim=1) if renumber else self.next_pos
        if positions <= 0:
            return WorkingMemory(DynamicCache(), mask, next_pos)
        layers = [(keys[..., start:, :], values[..., start:, :]) for keys, values, *_ in self.cache]
        return WorkingMemory(DynamicCache(ddp_cache_data=layers), mask, next_pos)


def forward_chunk(
    model: Any,
    memory: WorkingMemory,
    chunk_mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    head: bool = True,
) -> tuple[Any, WorkingMemory]:
    """Runs one chunk on top of the working memory and returns the outputs and the extended memory.

    With `head=False` only the decoder runs (no LM head: latent steps and thinker prefills need the last
    hidden state, never logits over the vocabulary); the outputs then carry `last_hidden_state`. With the
    head, only the last position's logits are computed (`logits_to_keep=1`): decoding reads no other, and
    over a prompt the vocabulary projection of every position was about a fifth of a prefill's work."""
    full_mask = torch.cat([memory.mask, chunk_mask], dim=1)
    positions = (memory.next_pos[:, None] + chunk_mask.cumsum(dim=1) - 1).clamp_min(0)
    extra = {"logits_to_keep": 1} if head else {}
    outputs = (model if head else model.get_decoder())(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=full_mask,
        position_ids=positions,
        past_key_values=memory.cache,
        use_cache=True,
        return_dict=True,
        **extra,
    )
    return outputs, WorkingMemory(outputs.past_key_values, full_mask, memory.next_pos + chunk_mask.sum(dim=1))


MIN_TEMPERATURE = 1e-5  # a tinier temperature (1e-40, subnormals) would overflow the softmax: it is as greedy


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks replaying measured lengths)


def pick_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else nucleus sampling."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(sampling.temperature, MIN_TEMPERATURE), dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Decoded:
    tokens: list[list[int]]
    first_logits: torch.Tensor
    memory: WorkingMemory
    forward_passes: int = 0


def decode_program(
    model: Any,
    tokenizer: Any,
    memory: WorkingMemory,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: Sampling,
    on_token: TokenCallback | None = None,
    agent: str = "",
    adapter: str | None = None,
) -> Program[Decoded]:
    """Prefills the prompt on the memory, then decodes row by row until EOS or the token limit; yields
    a `WorkItem` before each forward pass (labelled with `agent` and `adapter`)."""
    batch = prompt_ids.shape[0]
    yield WorkItem("prefill", agent, adapter, batch, int(prompt_ids.shape[1]), True)
    with torch.no_grad():
        outputs, memory = forward_chunk(model, memory, prompt_mask, input_ids=prompt_ids)
    logits = outputs.logits[:, -1, :]
    first_logits = logits.float().clone()
    eos = set(end_of_turn_ids(tokenizer, model))
    pad = pad_token_id(tokenizer)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(sampling.seed)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    passes = 1
    for step in range(sampling.max_new_tokens):
        chosen = pick_tokens(logits, sampling, generator).tolist()
        for row, token in enumerate(chosen):
            if done[row]:
                continue
            if token in eos and not sampling.ignore_eos:
                done[row] = True
                continue
            tokens[row].append(int(token))
            if on_token is not None:
                on_token(row, int(token))
        if all(done) or step == sampling.max_new_tokens - 1:
            break
        feed = torch.tensor([pad if done[r] else chosen[r] for r in range(batch)], device=prompt_ids.device)
        alive = torch.tensor([0 if done[r] else 1 for r in range(batch)], device=prompt_ids.device)
        yield WorkItem("decode", agent, adapter, batch, 1, True)
        with torch.no_grad():
            outputs, memory = forward_chunk(model, memory, alive[:, None], input_ids=feed[:, None])
        logits = outputs.logits[:, -1, :]
        passes += 1
    return Decoded(tokens, first_logits, memory, passes)


def decode(
    model: Any,
    tokenizer: Any,
    memory: WorkingMemory,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: Sampling,
    on_token: TokenCallback | None = None,
) -> Decoded:
    """`decode_program` run to its end by the caller, who already owns the model and its adapter."""
    return drive(
        decode_program(model, tokenizer, memory, prompt_ids, prompt_mask, sampling, on_token), no_adapter_scope
    )


@dataclass
class AgentTrace:
    """What one agent did: latent steps taken, prompt tokens read, tokens emitted, sequential forward
    passes run (prefill, latent steps, decode steps) and the size of the KV cache it ended with."""

    name: str
    role: Role
    adapter: str | None
    latent_steps: int = 0
    prompt_tokens: int = 0
    emitted_tokens: int = 0
    output: str = ""
    forward_passes: int = 0
    kv_bytes: int = 0
    row_prompt_tokens: list[int] = field(default_factory=list)
    row_emitted_tokens: list[int] = field(default_factory=list)


@dataclass
class PipelineResult:
    """Answers (one per question) and how they were produced."""

    pipeline: PipelineKind
    texts: list[str]
    tokens: list[list[int]]
    agents: list[AgentTrace]
    cache_length: int = 0
    seconds: float = 0.0
    first_logits: torch.Tensor | None = None
    segments: list[torch.Tensor] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        """Every token any agent emitted, for the whole batch."""
        return sum(a.emitted_tokens for a in self.agents)

    @property
    def forward_passes(self) -> int:
        return sum(a.forward_passes for a in self.agents)

    @property
    def kv_peak_bytes(self) -> int:
        """The largest KV cache any agent held (the latent pipeline's grows across agents)."""
        return max((a.kv_bytes for a in self.agents), default=0)

    def row(self, index: int) -> PipelineResult:
        """The result of one question of the batch (what a request batched with others gets back)."""
        traces = [
            replace(
                a,
                prompt_tokens=a.row_prompt_tokens[index] if a.row_prompt_tokens else a.prompt_tokens,
                emitted_tokens=a.row_emitted_tokens[index] if a.row_emitted_tokens else a.emitted_tokens,
                row_prompt_tokens=[],
                row_emitted_tokens=[],
            )
            for a in self.agents
        ]
        logits = None if self.first_logits is None else self.first_logits[index : index + 1]
        text, tokens = [self.texts[index]], [self.tokens[index]]
        return replace(self, texts=text, tokens=tokens, agents=traces, first_logits=logits, segments=[])

    def summary(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "agents": [a.name for a in self.agents],
            "latent_steps": sum(a.latent_steps for a in self.agents),
            "prompt_tokens": sum(a.prompt_tokens for a in self.agents),
            "forward_passes": self.forward_passes,
            "cache_length": self.cache_length,
            "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 4),
        }


def no_adapter_scope(_adapter: str | None, _batch: int) -> AbstractContextManager[None]:
    return nullcontext()


def peft_adapter_scope(model: Any) -> AdapterScope:
    """Adapter switching for a PEFT model: a named adapter, or the base model for None."""

    @contextmanager
    def scope(name: str | None, _batch: int) -> Iterator[None]:
        if name is None:
            with model.disable_adapter():
                yield
            return
        previous = model.active_adapter
        model.set_adapter(name)
        try:
            yield
        finally:
            model.set_adapter(previous)

    return scope


def _decode_texts(tokenizer: Any, tokens: list[list[int]]) -> list[str]:
    return [complete_text(tokenizer, row).strip() for row in tokens]


@torch.no_grad()
def run_text(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    sampling: Sampling,
    agents: Sequence[Agent] = DEFAULT_AGENTS,
    adapter_scope: AdapterScope = no_adapter_scope,
    on_token: TokenCallback | None = None,
    mode: Mode = "sequential",
    answer: AnswerFormat = "free",
    per_agent: Sequence[Sampling] | None = None,
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> PipelineResult:
    """The text baseline (the reference's TextMAS): every agent decodes text under the same token limit,
    and the earlier agents' outputs accumulate, each labelled with its agent, in the later agents'
    prompts. In hierarchical mode the experts answer independently and only the summarizer reads them.
    `per_agent` overrides the decoding of each agent (benchmarks replaying measured output lengths)."""
    started = time.perf_counter()
    device = model_device(model)
    contexts = ["" for _ in questions]
    outputs: list[str] = []
    traces: list[AgentTrace] = []
    decoded: Decoded | None = None
    for index, agent in enumerate(agents):
        final = index == len(agents) - 1
        rendered = [
            render_chat(tokenizer, text_messages(agent.role, q, c, mode, answer, prompts))
            for q, c in zip(questions, contexts, strict=True)
        ]
        ids, mask = encode(tokenizer, rendered, device)
        with adapter_scope(agent.adapter, len(questions)):
            decoded = decode(
                model,
                tokenizer,
                WorkingMemory.empty(len(questions), device),
                ids,
                mask,
                per_agent[index] if per_agent else sampling,
                on_token if final else None,
            )
        outputs = _decode_texts(tokenizer, decoded.tokens)
        if not final:
            contexts = [
                c + label_output(mode, agent.name, agent.role, o) for c, o in zip(contexts, outputs, strict=True)
            ]
        traces.append(
            AgentTrace(
                agent.name,
                agent.role,
                agent.adapter,
                prompt_tokens=int(mask.sum()),
                emitted_tokens=sum(len(t) for t in decoded.tokens),
                output=outputs[0] if len(outputs) == 1 else "",
                forward_passes=decoded.forward_passes,
                kv_bytes=decoded.memory.nbytes,
                row_prompt_tokens=mask.sum(dim=1).tolist(),
                row_emitted_tokens=[len(t) for t in decoded.tokens],
            )
        )
    assert decoded is not None
    return PipelineResult(
        "text",
        outputs,
        decoded.tokens,
        traces,
        cache_length=decoded.memory.length,
        seconds=time.perf_counter() - started,
        first_logits=decoded.first_logits,
    )


@torch.no_grad()
def run_single(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    sampling: Sampling,
    adapter: str | None = None,
    adapter_scope: AdapterScope = no_adapter_scope,
    on_token: TokenCallback | None = None,
    answer: AnswerFormat = "free",
) -> PipelineResult:
    """One agent answers directly."""
    started = time.perf_counter()
    device = model_device(model)
    ids, mask = encode(tokenizer, [render_chat(tokenizer, single_messages(q, answer)) for q in questions], device)
    with adapter_scope(adapter, len(questions)):
        decoded = decode(model, tokenizer, WorkingMemory.empty(len(questions), device), ids, mask, sampling, on_token)
    trace = AgentTrace("Assistant", "judger", adapter, prompt_tokens=int(mask.sum()))
    trace.emitted_tokens = sum(len(t) for t in decoded.tokens)
    trace.forward_passes = decoded.forward_passes
    trace.kv_bytes = decoded.memory.nbytes
    trace.row_prompt_tokens = mask.sum(dim=1).tolist()
    trace.row_emitted_tokens = [len(t) for t in decoded.tokens]
    return PipelineResult(
        "single",
        _decode_texts(tokenizer, decoded.tokens),
        decoded.tokens,
        [trace],
        cache_length=decoded.memory.length,
        seconds=time.perf_counter() - started,
        first_logits=decoded.first_logits,
    )
