"""The baselines and prompts follow the reference: TextMAS accumulates every earlier agent's labelled
output (sequential) or hands the experts' labelled answers to the summarizer only (hierarchical), under
one token limit for every agent; the final agent reasons step by step in the task's answer format; the
stack's `inference.agents` section sets the latent defaults."""

from __future__ import annotations

import pytest
from latentmas.services.agent_prompts import FORMAT_INSTRUCTIONS, agent_prompt
from latentmas.services.reasoning_api import latent_config_from_spec
from latentmas.services.text_pipeline import Sampling, run_single, run_text
from latentmas.spec import InferenceSpec
from pydantic import ValidationError

from tests.reasoning.helpers import prefills

pytestmark = pytest.mark.reasoning
QUESTION = "What is 12 times 7?"


def test_sequential_text_mas_accumulates_labelled_outputs_under_one_limit(tiny_lm):
    model, tokenizer = tiny_lm
    sampling = Sampling(max_new_tokens=5)
    result, prompts = prefills(model, tokenizer, lambda: run_text(model, tokenizer, [QUESTION], sampling))
    planner, critic, refiner, _ = result.agents
    assert all(0 < a.forward_passes <= sampling.max_new_tokens for a in result.agents)
    labelled = [f"[{a.name}]:\n{a.output}\n\n" for a in (planner, critic, refiner)]
    assert labelled[0] in prompts[1] and labelled[1] not in prompts[1]
    assert labelled[0] + labelled[1] in prompts[2]
    assert "".join(labelled) in prompts[3]
    assert "\\boxed" not in prompts[3] and FORMAT_INSTRUCTIONS["free"] in prompts[3]


def test_hierarchical_text_mas_hands_the_experts_answers_to_the_summarizer(tiny_lm):
    model, tokenizer = tiny_lm
    result, prompts = prefills(
        model,
        tokenizer,
        lambda: run_text(model, tokenizer, [QUESTION], Sampling(max_new_tokens=4), mode="hierarchical", answer="boxed"),
    )
    experts = result.agents[:3]
    for prompt in prompts[:3]:
        assert "[Math Agent]" not in prompt and "\\boxed{YOUR_FINAL_ANSWER}" in prompt
    labels = ("Math Agent", "Science Agent", "Code Agent")
    summary = "".join(f"[{label}]:\n{a.output}\n\n" for label, a in zip(labels, experts, strict=True))
    assert summary in prompts[3] and "task summarizer" in prompts[3]


@pytest.mark.parametrize("answer", ["boxed", "choice"])
def test_answer_formats_reach_every_final_agent(tiny_lm, answer):
    model, tokenizer = tiny_lm
    instruction = FORMAT_INSTRUCTIONS[answer]
    for method in ("latent", "text"):
        assert agent_prompt(method, "sequential", "judger", QUESTION, answer=answer).endswith(instruction)
        assert instruction not in agent_prompt(method, "sequential", "planner", QUESTION, answer=answer)
    _, prompts = prefills(
        model, tokenizer, lambda: run_single(model, tokenizer, [QUESTION], Sampling(2), answer=answer)
    )
    assert instruction in prompts[0]


def test_stack_agents_section_sets_the_latent_defaults():
    spec = InferenceSpec.model_validate(
        {
            "agents": {
                "latentSteps": 40,
                "mode": "hierarchical",
                "keepCache": "last_agent",
                "positions": "continuous",
                "realign": True,
                "realignLambda": 0.01,
            }
        }
    )
    config = latent_config_from_spec(spec.agents)
    assert (config.latent_steps, config.mode, config.keep, config.positions) == (
        40,
        "hierarchical",
        "last_agent",
        "continuous",
    )
    assert config.realign is True and config.lam == 0.01
    default = latent_config_from_spec(InferenceSpec().agents)
    assert default.realign is False and default.positions == "reference" and default.latent_steps == 8
    with pytest.raises(ValidationError, match="realignLambda"):
        InferenceSpec.model_validate({"agents": {"realignLambda": 0}})
