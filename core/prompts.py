"""The one prompt builder: which messages a model sees, shared by synthesis (the SFT data it writes),
training (the router's prompts) and serving (every request, with or without RAG context).

Training and serving must show the model the same system prompt and the same context layout, or an
expert is served prompts it never saw. How messages become text is the base's chat template
(`latentmas.chat`); this module decides only the messages."""

from __future__ import annotations

import string
from collections.abc import Collection, Sequence
from typing import Protocol

SYSTEM_PROMPT = "You are a domain expert. Answer precisely, using only what the reference documentation supports."
CONTEXT_INSTRUCTION = "Answer using the context and cite sources as [n]."

Message = dict[str, str]

QUESTION, FORMAT, CONTEXT = "question", "format", "context"
"""The placeholders of a stack's agent prompt templates: the question (with its RAG context), the answer
format's instruction, and the earlier agents' labelled outputs (text agents that read them only)."""


class Source(Protocol):
    """A numbered context passage (a RAG citation, or the chunk an SFT example was written from)."""

    @property
    def n(self) -> int: ...
    @property
    def source(self) -> str: ...
    @property
    def text(self) -> str: ...


def with_context(question: str, sources: Sequence[Source]) -> str:
    """The user turn with numbered context above the question; the question alone without sources."""
    if not sources:
        return question
    context = "\n".join(f"[{s.n}] ({s.source}) {s.text}" for s in sources)
    return f"Context:\n{context}\n\n{CONTEXT_INSTRUCTION}\nQuestion: {question}"


def question_of(user_turn: str) -> str:
    """The question inside a user turn `with_context` wrote (the turn itself when it holds no context)."""
    marker = f"\n\n{CONTEXT_INSTRUCTION}\nQuestion: "
    if user_turn.startswith("Context:\n") and marker in user_turn:
        return user_turn.rsplit(marker, 1)[1]
    return user_turn


def routing_text(messages: Sequence[Message]) -> str:
    """What the router reads, in training and in serving alike: the last user question, without the retrieved
    context, the system prompt or earlier turns (those carry the layout, not the domain)."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("the router needs a user turn to read")
    return question_of(users[-1])


def request_messages(
    messages: Sequence[Message] = (), prompt: str | None = None, system_prompt: str | None = None
) -> list[Message]:
    """A conversation as the model sees it: the caller's messages, `prompt` as a last user turn, and a
    system turn first (`system_prompt`, else the caller's own, else SYSTEM_PROMPT, the one SFT used)."""
    turns = [dict(m) for m in messages]
    if prompt is not None:
        turns.append({"role": "user", "content": prompt})
    if not turns:
        raise ValueError("a prompt or at least one message is required")
    if system_prompt:
        turns = [{"role": "system", "content": system_prompt}, *(m for m in turns if m["role"] != "system")]
    elif turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return turns


def training_messages(question: str, answer: str, sources: Sequence[Source] = ()) -> list[Message]:
    """One SFT example: the serving-side prompt for `question` (with its context, if any) and the answer."""
    return [*request_messages(prompt=with_context(question, sources)), {"role": "assistant", "content": answer}]


def template_problem(template: str, allowed: Collection[str]) -> str | None:
    """Why `template` cannot be an agent prompt (None when it can): every `{placeholder}` must be one of
    `allowed`, plain (no index, conversion or format spec), and `{question}` must be there, or the agent
    would not see the question. Literal braces are written `{{` and `}}`, as in str.format."""
    names: set[str] = set()
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as err:
        return f"not a template ({err}); write a literal brace as {{{{ or }}}}"
    for name, spec, conversion in fields:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            return f"unknown placeholder {{{shown}}}; allowed: " + ", ".join(f"{{{a}}}" for a in sorted(allowed))
        names.add(name)
    if QUESTION not in names:
        return "must contain {question}"
    return None
