"""The agents' role prompts, in the layout of the LatentMAS reference code (Gen-Verse/LatentMAS,
`prompts.py`), reworded for a domain-expert chat service.

Two methods (`latent`: an agent's context is the KV cache; `text`: it is the earlier agents' labelled
outputs) times two modes (`sequential`: planner → critic → refiner → judger; `hierarchical`: three
domain experts and a summarizer). The final agent reasons step by step and ends with an answer in the
task's `AnswerFormat`: `free` (a chat answer), `boxed` (a final value in \\boxed{}) or `choice`
(one letter A-D in \\boxed{}). The base's chat template renders them; no `<think>` wrapper is added,
because the bases this project serves (SmolLM2, the toy bases) define no thinking block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["planner", "critic", "refiner", "judger"]
Mode = Literal["sequential", "hierarchical"]
Method = Literal["latent", "text"]
AnswerFormat = Literal["free", "boxed", "choice"]

SYSTEM = "You are a helpful assistant in a team of expert agents."

FORMAT_INSTRUCTIONS: dict[AnswerFormat, str] = {
    "free": "Reason step by step, then give the final answer clearly and concisely.",
    "boxed": "Reason step by step and put the final answer inside \\boxed{YOUR_FINAL_ANSWER}.",
    "choice": (
        "Reason step by step. The final answer must be one of A, B, C, D, written inside \\boxed{}, "
        "for example \\boxed{A}, with nothing else inside the box."
    ),
}

_PLAN = (
    "You are the Planner agent. Given the question, design a clear step-by-step plan for solving it.\n\n"
    "Question: {question}\n\nKeep the plan concise, a few bullet points per step. Do not give the final answer."
)
_LATENT_SEQUENTIAL: dict[Role, str] = {
    "planner": _PLAN,
    "critic": (
        "Question: {question}\n\nYou are the Critic agent. The Planner's plan is in your latent working memory. "
        "Check it for mistakes and gaps and give concrete feedback on how to improve it."
    ),
    "refiner": (
        "Question: {question}\n\nYou are the Refiner agent. Your latent working memory holds a plan and feedback "
        "on it. Write a refined, correct and concise step-by-step plan."
    ),
    "judger": (
        "Target question: {question}\n\nYou are the final agent. Your latent working memory holds the other "
        "agents' reasoning; it may contain irrelevant content, ignore it where it does not help. "
        "Solve the target question. {format}"
    ),
}
_TEXT_SEQUENTIAL: dict[Role, str] = {
    "planner": _PLAN,
    "critic": (
        "You are the Critic agent. You are given the question and the Planner's plan.\n\nQuestion: {question}\n\n"
        "Plan from the Planner:\n{context}\n\nCheck the plan for mistakes and gaps and give concrete feedback."
    ),
    "refiner": (
        "You are the Refiner agent. You are given the question, the Planner's plan and the Critic's feedback.\n\n"
        "Question: {question}\n\nPlan and feedback:\n{context}\n\n"
        "Write a refined, correct and concise step-by-step plan."
    ),
    "judger": (
        "Target question: {question}\n\nYou are the final agent of a planner -> critic -> refiner -> solver team. "
        "The other agents' outputs:\n{context}\n\nThey may contain irrelevant or wrong content; ignore it where "
        "it does not help. Solve the target question. {format}"
    ),
}
_EXPERT = "You are a {who}. Given the question, {format}\n\nQuestion: {question}\n\nYour response:"
_EXPERTS: dict[Role, str] = {"planner": "math agent", "critic": "science agent", "refiner": "code agent"}
_SUMMARIZER = {
    "latent": (
        "You are the task summarizer. The experts' reasoning is in your latent working memory for reference. "
        "Given the question, {format}\n\nQuestion: {question}\n\nYour response:"
    ),
    "text": (
        "You are the task summarizer. Given the question and the experts' responses as reference, {format}\n\n"
        "Responses from the experts:\n{context}\n\nQuestion: {question}\n\nYour response:"
    ),
}
HIERARCHICAL_LABELS: dict[Role, str] = {
    "planner": "Math Agent",
    "critic": "Science Agent",
    "refiner": "Code Agent",
    "judger": "Task Summarizer",
}


HIERARCHICAL_SLOTS: dict[Role, str] = {
    "planner": "math_agent",
    "critic": "science_agent",
    "refiner": "code_agent",
    "judger": "summarizer",
}
"""The template slot (`spec.inference.agents.prompts.<method>.<slot>`) of each role in hierarchical mode;
in sequential mode the slot is the role's own name."""


@dataclass(frozen=True)
class PromptSet:
    """A stack's own prompts: the agents' system turn and templates replacing built-in user turns, keyed
    `(method, slot)`. Hashable, so equal prompt sets batch together and enter the cache scope."""

    system: str = SYSTEM
    templates: tuple[tuple[Method, str, str], ...] = ()

    def template(self, method: Method, slot: str) -> str | None:
        return next((t for m, s, t in self.templates if (m, s) == (method, slot)), None)


DEFAULT_PROMPTS = PromptSet()


def prompts_from_spec(spec: Any) -> PromptSet:
    """The stack's `inference.agents.prompts` (`latentmas.spec.AgentPromptsSpec`, validated at admission)."""
    templates = tuple(
        (method, slot, template)
        for method in ("latent", "text")
        for slot, template in getattr(spec, method).model_dump().items()
        if template is not None
    )
    return PromptSet(spec.system or SYSTEM, templates)  # type: ignore[arg-type]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def agent_prompt(
    method: Method,
    mode: Mode,
    role: Role,
    question: str,
    context: str = "",
    answer: AnswerFormat = "free",
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> str:
    """The user turn of one agent: the stack's template for its slot, else the built-in one. Only the
    final agent gets the answer format in sequential mode; in hierarchical mode every expert answers in
    it (each solves the question, as in the reference)."""
    instruction = FORMAT_INSTRUCTIONS[answer]
    custom = prompts.template(method, HIERARCHICAL_SLOTS[role] if mode == "hierarchical" else role)
    if custom is not None:
        return custom.format(question=question, context=context, format=instruction)
    if mode == "hierarchical":
        if role == "judger":
            return _SUMMARIZER[method].format(question=question, context=context, format=_lower_first(instruction))
        return _EXPERT.format(who=_EXPERTS[role], question=question, format=_lower_first(instruction))
    table = _LATENT_SEQUENTIAL if method == "latent" else _TEXT_SEQUENTIAL
    return table[role].format(question=question, context=context, format=instruction)


def agent_messages(
    method: Method,
    mode: Mode,
    role: Role,
    question: str,
    context: str = "",
    answer: AnswerFormat = "free",
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> list[dict[str, str]]:
    """System + user messages of one agent, ready for the base's chat template."""
    return [
        {"role": "system", "content": prompts.system},
        {"role": "user", "content": agent_prompt(method, mode, role, question, context, answer, prompts)},
    ]


def label_output(mode: Mode, name: str, role: Role, text: str) -> str:
    """One agent's output as the text baseline's later agents read it: `[Name]:` then the text."""
    label = HIERARCHICAL_LABELS[role] if mode == "hierarchical" else name
    return f"[{label}]:\n{text}\n\n"
