"""A stack's own agent prompts (`spec.inference.agents.prompts`): its templates and system turn reach
the agents of both pipelines in both modes, unset roles keep the built-in prompts, its answer format is
the default a request can override; a template with an unknown placeholder (or without the question) is
refused at admission, by the real API server and by the operator's parse, in one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from latentmas.operator.reconciler import parse_stack
from latentmas.services.agent_prompts import DEFAULT_PROMPTS, FORMAT_INSTRUCTIONS, agent_prompt, prompts_from_spec
from latentmas.services.reasoning_api import reasoning_settings
from latentmas.services.sessions import SessionStore
from latentmas.spec import InferenceSpec
from latentmas.testing.controlplane import ControlPlane
from latentmas.testing.procs import eventually

from tests.reasoning.helpers import build_app, prefills, service_for

pytestmark = pytest.mark.reasoning
QUESTION = "What is 12 times 7?"
SYSTEM = "You answer for the Acme desk."
PROMPTS = {
    "system": SYSTEM,
    "answerFormat": "boxed",
    "latent": {"judger": "JUDGE {question} -- {format}", "summarizer": "SUMMARY {question} -- {format}"},
    "text": {"critic": "CRITIC of {{notes}}:\n{context}Q: {question}", "mathAgent": "MATH {question}"},
}
CRD = Path(__file__).resolve().parents[2] / "crds" / "latentmasstack.yaml"


def chat_prefills(client: TestClient, backend: Any, **ask: Any) -> list[str]:
    """The prompts the model prefilled (row 0) while the service answered one uncached request."""
    request = {"prompt": QUESTION, "max_tokens": 4, "latent_steps": 2, "use_cache": False, **ask}
    decoder = backend.model.get_base_model()
    response, seen = prefills(decoder, backend.tokenizer, lambda: client.post("/reasoning/chat", json=request))
    assert response.status_code == 200, response.text
    return seen


def test_a_stacks_templates_reach_the_agents_prompts(tmp_path, backend):
    settings = reasoning_settings(InferenceSpec.model_validate({"agents": {"prompts": PROMPTS}}), 32)
    client = TestClient(build_app(service_for(backend, SessionStore(tmp_path / "s.db"), settings=settings)))
    boxed, choice = FORMAT_INSTRUCTIONS["boxed"], FORMAT_INSTRUCTIONS["choice"]

    latent = chat_prefills(client, backend, pipeline="latent")
    assert len(latent) == 4 and all(SYSTEM in p for p in latent)
    assert f"JUDGE {QUESTION} -- {boxed}" in latent[3]  # the stack's default answer format
    assert agent_prompt("latent", "sequential", "planner", QUESTION) in latent[0]  # unset: built-in
    assert "JUDGE" not in "".join(latent[:3])
    overridden = chat_prefills(client, backend, pipeline="latent", answer_format="choice")
    assert f"JUDGE {QUESTION} -- {choice}" in overridden[3]
    hierarchical = chat_prefills(client, backend, pipeline="latent", agents_mode="hierarchical")
    assert f"SUMMARY {QUESTION} -- {boxed}" in hierarchical[3] and "JUDGE" not in hierarchical[3]

    text = chat_prefills(client, backend, pipeline="text")
    assert len(text) == 4 and all(SYSTEM in p for p in text)
    assert "CRITIC of {notes}:\n[Planner]:\n" in text[1] and f"Q: {QUESTION}" in text[1]
    assert "You are the Refiner agent" in text[2] and "[Critic]:\n" in text[2]  # built-in, reads both
    assert boxed in text[3]
    experts = chat_prefills(client, backend, pipeline="text", agents_mode="hierarchical")
    assert f"MATH {QUESTION}" in experts[0] and "MATH" not in experts[1]


def test_the_default_prompts_are_the_built_in_ones():
    agents = InferenceSpec().agents
    assert prompts_from_spec(agents.prompts) == DEFAULT_PROMPTS and agents.prompts.answer_format == "free"


BAD_TEMPLATES = [
    ({"latent": {"judger": "{question} {context}"}}, "latent.judger", "unknown placeholder"),
    ({"text": {"planner": "{question} after {context}"}}, "text.planner", "unknown placeholder"),
    ({"text": {"summarizer": "{question} {answer}"}}, "text.summarizer", "unknown placeholder"),
    ({"latent": {"mathAgent": "Solve it. {format}"}}, "latent.mathAgent", "must contain {question}"),
]


def test_a_bad_template_is_refused_at_admission_naming_the_field(control_plane: ControlPlane):
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))

    def established() -> bool:
        crd = json.loads(control_plane.kubectl("get", "crd/latentmasstacks.latentmas.io", "-o", "json"))
        return any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"].get("conditions", []))

    eventually(established, 60, "an Established CRD")

    def stack(prompts: dict[str, Any]) -> dict[str, Any]:
        spec = {
            "storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "s3"}},
            "experts": [{"name": "law", "domain": "law"}],
            "inference": {"agents": {"prompts": prompts}},
        }
        meta = {"name": "prompts", "namespace": "default", "uid": "u1"}
        return {"apiVersion": "latentmas.io/v1alpha1", "kind": "LatentMASStack", "metadata": meta, "spec": spec}

    def admit(prompts: dict[str, Any]) -> str:
        body = yaml.safe_dump({**stack(prompts), "metadata": {"name": "prompts"}})
        return control_plane.kubectl("create", "--dry-run=server", "-n", "default", "-f", "-", input_text=body)

    admit(PROMPTS)  # literal braces, every placeholder where it is allowed: accepted
    assert parse_stack(stack(PROMPTS)).spec_error is None
    for prompts, field, message in BAD_TEMPLATES:
        with pytest.raises(RuntimeError) as refused:
            admit(prompts)
        lines = [line for line in str(refused.value).splitlines() if field in line]
        assert lines and message in lines[0], str(refused.value)
        error = parse_stack(stack(prompts)).spec_error
        assert error is not None and "\n" not in error
        assert error.startswith(f"spec.inference.agents.prompts.{field}:") and message in error, error
