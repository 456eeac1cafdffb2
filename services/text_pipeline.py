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
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from latentmas.chat import end_of_turn_ids, pad_token_id, render
from latentmas.prompts import request_messages
from latentmas.services.detokenize import complete_text
from transformers import DynamicCache

Role = Literal["planner", "critic", "refiner", "judger"]
Mode = Literal["sequential", "hierarchical"]
PipelineKind = Literal["latent", "text", "single"]
AdapterScope = Callable[[str | None, int], AbstractContextManager[Any]]
"""(adapter or None for the base model, batch size) -> a context in which forward passes use that adapter."""
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

SYSTEM = "You are a helpful assistant in a team of expert agents."

_LATENT_SEQUENTIAL: dict[Role, str] = {
    "planner": (
        "You are the Planner agent. Design a short step-by-step plan for answering the question.\n\n"
        "Question: {question}\n\nKeep the plan to a few bullet points and do not give the final answer."
    ),
    "critic": (
        "Question: {question}\n\nYou are the Critic agent. The Planner's plan is in your latent working memory. "
        "Check it for mistakes and gaps and give concrete feedback on how to improve it."
    ),
    "refiner": (
        "Question: {question}\n\nYou are the Refiner agent. Your latent working memory holds a plan and feedback "
        "on it. Write an improved, correct and concise plan."
    ),
    "judger": (
        "Question: {question}\n\nYou are the Judger agent. Your latent working memory holds the other agents' "
        "reasoning; use it where it helps and ignore what is irrelevant. Answer the question directly."
    ),
}

_LATENT_HIERARCHICAL: dict[Role, str] = {
    "planner": "You are a domain expert. Reason step by step about the question.\n\nQuestion: {question}",
    "critic": "You are a second domain expert. Reason step by step about the question.\n\nQuestion: {question}",
    "refiner": "You are a third domain expert. Reason step by step about the question.\n\nQuestion: {question}",
    "judger": (
        "You are the summarizer. Using the experts' reasoning in your latent working memory as reference, "
        "answer the question.\n\nQuestion: {question}"
    ),
}

_TEXT: dict[Role, str] = {
    "planner": _LATENT_SEQUENTIAL["planner"],
    "critic": (
        "You are the Critic agent.\n\nQuestion: {question}\n\nPlan from the Planner:\n{context}\n\n"
        "Check the plan for mistakes and gaps and give concrete feedback."
    ),
    "refiner": (
        "You are the Refiner agent.\n\nQuestion: {question}\n\nPlan and feedback:\n{context}\n\n"
        "Write an improved, correct and concise plan."
    ),
    "judger": (
        "You are the Judger agent.\n\nQuestion: {question}\n\nRefined plan from the other agents:\n{context}\n\n"
        "Use the plan where it helps and answer the question directly."
    ),
}


def latent_messages(role: Role, question: str, mode: Mode = "sequential") -> list[dict[str, str]]:
    """Chat messages for an agent of the latent pipeline (its context lives in the KV cache)."""
    table = _LATENT_SEQUENTIAL if mode == "sequential" else _LATENT_HIERARCHICAL
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": table[role].format(question=question)}]


def text_messages(role: Role, question: str, context: str = "") -> list[dict[str, str]]:
    """Chat messages for an agent of the text pipeline (its context is the previous agent's text)."""
    content = _TEXT[role].format(question=question, context=context)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def single_messages(question: str) -> list[dict[str, str]]:
    """One expert answering: the same system prompt and layout its SFT data had."""
    return request_messages(prompt=question)


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

    def keep_last(self, positions: int) -> WorkingMemory:
        """Only the last `positions` cached positions (the reference code's cache truncation); position
        ids keep counting from where they were, so relative distances stay those the keys were built with."""
        if positions >= self.length:
            return self
        start = self.length - positions
        layers = [(keys[..., start:, :], values[..., start:, :]) for keys, values, *_ in self.cache]
        return WorkingMemory(DynamicCache(ddp_cache_data=layers), self.mask[:, start:], self.next_pos)


def forward_chunk(
    model: Any,
    memory: WorkingMemory,
    chunk_mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[Any, WorkingMemory]:
    """Runs one chunk on top of the working memory and returns the outputs and the extended memory."""
    full_mask = torch.cat([memory.mask, chunk_mask], dim=1)
    positions = (memory.next_pos[:, None] + chunk_mask.cumsum(dim=1) - 1).clamp_min(0)
    outputs = model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=full_mask,
        position_ids=positions,
        past_key_values=memory.cache,
        use_cache=True,
        output_hidden_states=True,
        return_dict=True,
    )
    return outputs, WorkingMemory(outputs.past_key_values, full_mask, memory.next_pos + chunk_mask.sum(dim=1))


MIN_TEMPERATURE = 1e-5  # a tinier temperature (1e-40, subnormals) would overflow the softmax: it is as greedy


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


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


@torch.no_grad()
def decode(
    model: Any,
    tokenizer: Any,
    memory: WorkingMemory,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: Sampling,
    on_token: TokenCallback | None = None,
) -> Decoded:
    """Prefills the prompt on the memory, then decodes row by row until EOS or the token limit."""
    outputs, memory = forward_chunk(model, memory, prompt_mask, input_ids=prompt_ids)
    logits = outputs.logits[:, -1, :]
    first_logits = logits.float().clone()
    batch = prompt_ids.shape[0]
    eos = set(end_of_turn_ids(tokenizer, model))
    pad = pad_token_id(tokenizer)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(sampling.seed)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(sampling.max_new_tokens):
        chosen = pick_tokens(logits, sampling, generator).tolist()
        for row, token in enumerate(chosen):
            if done[row]:
                continue
            if token in eos:
                done[row] = True
                continue
            tokens[row].append(int(token))
            if on_token is not None:
                on_token(row, int(token))
        if all(done) or step == sampling.max_new_tokens - 1:
            break
        feed = torch.tensor([pad if done[r] else chosen[r] for r in range(batch)], device=prompt_ids.device)
        alive = torch.tensor([0 if done[r] else 1 for r in range(batch)], device=prompt_ids.device)
        outputs, memory = forward_chunk(model, memory, alive[:, None], input_ids=feed[:, None])
        logits = outputs.logits[:, -1, :]
    return Decoded(tokens, first_logits, memory)


@dataclass
class AgentTrace:
    """What one agent did: latent steps taken, prompt tokens read, tokens emitted."""

    name: str
    role: Role
    adapter: str | None
    latent_steps: int = 0
    prompt_tokens: int = 0
    emitted_tokens: int = 0
    output: str = ""


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

    def summary(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "agents": [a.name for a in self.agents],
            "latent_steps": sum(a.latent_steps for a in self.agents),
            "prompt_tokens": sum(a.prompt_tokens for a in self.agents),
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
    agent_sampling: Sampling | None = None,
    agents: Sequence[Agent] = DEFAULT_AGENTS,
    adapter_scope: AdapterScope = no_adapter_scope,
    on_token: TokenCallback | None = None,
) -> PipelineResult:
    """The text baseline: every agent decodes text; the next agent reads it in its prompt."""
    started = time.perf_counter()
    device = model_device(model)
    contexts = ["" for _ in questions]
    traces: list[AgentTrace] = []
    decoded: Decoded | None = None
    for index, agent in enumerate(agents):
        final = index == len(agents) - 1
        prompts = [
            render_chat(tokenizer, text_messages(agent.role, q, c)) for q, c in zip(questions, contexts, strict=True)
        ]
        ids, mask = encode(tokenizer, prompts, device)
        with adapter_scope(agent.adapter, len(questions)):
            decoded = decode(
                model,
                tokenizer,
                WorkingMemory.empty(len(questions), device),
                ids,
                mask,
                sampling if final else (agent_sampling or sampling),
                on_token if final else None,
            )
        contexts = _decode_texts(tokenizer, decoded.tokens)
        traces.append(
            AgentTrace(
                agent.name,
                agent.role,
                agent.adapter,
                prompt_tokens=int(mask.sum()),
                emitted_tokens=sum(len(t) for t in decoded.tokens),
                output=contexts[0] if len(contexts) == 1 else "",
            )
        )
    assert decoded is not None
    return PipelineResult(
        "text",
        contexts,
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
) -> PipelineResult:
    """One agent answers directly."""
    started = time.perf_counter()
    device = model_device(model)
    ids, mask = encode(tokenizer, [render_chat(tokenizer, single_messages(q)) for q in questions], device)
    with adapter_scope(adapter, len(questions)):
        decoded = decode(model, tokenizer, WorkingMemory.empty(len(questions), device), ids, mask, sampling, on_token)
    trace = AgentTrace("Assistant", "judger", adapter, prompt_tokens=int(mask.sum()))
    trace.emitted_tokens = sum(len(t) for t in decoded.tokens)
    return PipelineResult(
        "single",
        _decode_texts(tokenizer, decoded.tokens),
        decoded.tokens,
        [trace],
        cache_length=decoded.memory.length,
        seconds=time.perf_counter() - started,
        first_logits=decoded.first_logits,
    )
