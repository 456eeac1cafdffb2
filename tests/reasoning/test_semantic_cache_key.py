"""Every request and settings field either enters the semantic-cache scope or is on the explicit
output-irrelevant list (with its reason): a new field on neither fails here. Then the reported fault:
an m=40 hierarchical request must not be answered from an m=8 sequential request's entry."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fastapi.testclient import TestClient
from latentmas.services.agent_prompts import PromptSet
from latentmas.services.latent_pipeline import LatentConfig
from latentmas.services.reasoning_api import CACHE_IRRELEVANT, ChatRequest, ReasoningService, ReasoningSettings
from latentmas.services.semantic_cache import SemanticCache
from latentmas.services.sessions import SessionStore

from tests.reasoning.helpers import build_app, service_for

pytestmark = pytest.mark.reasoning

# A second valid value for each field that decides an answer (the first is the default/base below).
REQUEST_ALTERNATIVES: dict[str, Any] = {
    "pipeline": "text",
    "lora_adapter": "law",
    "no_default_data": True,
    "max_tokens": 7,
    "temperature": 0.5,
    "top_p": 0.5,
    "latent_steps": 40,
    "agents_mode": "hierarchical",
    "keep_cache": "latent_only",
    "positions": "continuous",
    "realign": True,
    "realign_lambda": 0.5,
    "answer_format": "boxed",
}
SETTINGS_ALTERNATIVES: dict[str, Any] = {
    "default_pipeline": "latent",
    "latent": LatentConfig(latent_steps=3),
    "rag_k": 9,
    "max_tokens": 5,  # the server cap: a request without max_tokens gets min(128, cap)
    "prompts": PromptSet(templates=(("latent", "judger", "{question}"),)),
    "answer_format": "boxed",  # the stack's default, for requests that do not set one
}
BASE = {"prompt": "What drives bond returns?", "max_tokens": None}


class _Backend:
    """Only what `resolve` needs: nothing (it reads the request and the settings)."""

    def run_program(self, *_args: Any) -> Any:
        raise AssertionError("not used")


def scope(request: dict[str, Any], settings: ReasoningSettings | None = None) -> str:
    service = ReasoningService(_Backend(), None, settings=settings)
    req = ChatRequest.model_validate(request)
    cap = service.settings.max_tokens
    req = req.model_copy(update={"max_tokens": req.max_tokens or min(128, cap or 128)})
    return service.resolve(req, req.lora_adapter).scope()


def test_every_request_field_is_in_the_key_or_declared_irrelevant():
    fields = set(ChatRequest.model_fields)
    unknown = fields - set(REQUEST_ALTERNATIVES) - set(CACHE_IRRELEVANT)
    assert not unknown, f"ChatRequest fields {sorted(unknown)}: add them to the cache scope or CACHE_IRRELEVANT"
    base = scope(BASE)
    for name, value in REQUEST_ALTERNATIVES.items():
        assert scope({**BASE, name: value}) != base, f"request field {name!r} does not reach the cache scope"


def test_every_settings_field_is_in_the_key_or_declared_irrelevant():
    fields = {f.name for f in dataclasses.fields(ReasoningSettings)}
    unknown = fields - set(SETTINGS_ALTERNATIVES) - set(CACHE_IRRELEVANT)
    assert not unknown, f"ReasoningSettings fields {sorted(unknown)}: add them to the cache scope or CACHE_IRRELEVANT"
    base = scope(BASE, ReasoningSettings())
    for name, value in SETTINGS_ALTERNATIVES.items():
        changed = scope(BASE, ReasoningSettings(**{name: value}))
        assert changed != base, f"settings field {name!r} does not reach the cache scope"
    # Each latent option of the stack's defaults reaches it too.
    for field in dataclasses.fields(LatentConfig):
        other = {"latent_steps": 2, "mode": "hierarchical", "keep": "last_agent", "realign": True, "lam": 0.3}
        value = other.get(field.name, "continuous")
        latent = dataclasses.replace(LatentConfig(), **{field.name: value})
        changed = scope({**BASE, "pipeline": "latent"}, ReasoningSettings(latent=latent))
        assert changed != scope({**BASE, "pipeline": "latent"}), f"LatentConfig.{field.name} is not in the scope"


def test_different_latent_settings_never_share_an_entry(tmp_path, backend, embedder):
    cache = SemanticCache(embedder, threshold=0.9)
    settings = ReasoningSettings(latent=LatentConfig(latent_steps=2))
    client = TestClient(
        build_app(service_for(backend, SessionStore(tmp_path / "s.db"), cache=cache, settings=settings))
    )
    ask = {"prompt": "Plan a bond ladder.", "max_tokens": 8, "pipeline": "latent"}
    first = client.post("/reasoning/chat", json={**ask, "latent_steps": 2}).json()
    assert first["cached"] is False and first["latent_steps"] == 6 and first["response"]
    other = client.post("/reasoning/chat", json={**ask, "latent_steps": 8}).json()
    assert other["cached"] is False and other["latent_steps"] == 24 and other["response"]
    again = client.post("/reasoning/chat", json={**ask, "latent_steps": 8}).json()
    assert again["cached"] is True and again["latent_steps"] == 24
    changes = ({"agents_mode": "hierarchical"}, {"keep_cache": "last_agent"}, {"top_p": 0.5}, {"realign": True})
    for change in (*changes, {"answer_format": "boxed"}, {"positions": "continuous", "keep_cache": "latent_only"}):
        assert client.post("/reasoning/chat", json={**ask, **change}).json()["cached"] is False, change
