"""The request path: RAG citations (promoted index, inline documents, no_default_data, reload on
promotion), sessions that survive a restart, the semantic cache and its invalidation, and the
per-request pipeline choice."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from latentmas.jobs.retrieval import Hit
from latentmas.registry import load_registry
from latentmas.services.latent_pipeline import LatentConfig
from latentmas.services.rag_context import RagContext, StackIndex, augment
from latentmas.services.reasoning_api import ReasoningSettings
from latentmas.services.semantic_cache import SemanticCache
from latentmas.services.sessions import SessionStore
from latentmas.store import LocalStore

from tests.reasoning.helpers import BUCKET, NAMESPACE, STACK, build_app, publish_index, service_for

pytestmark = pytest.mark.reasoning

CORPUS_V1 = {
    "bonds-101": "Bond prices fall when interest rates rise, because fixed coupons become less attractive.",
    "equity-101": "Equity risk premia compensate investors for holding stocks instead of government bonds.",
    "contracts-101": "A contract needs offer, acceptance and consideration to be enforceable in court.",
}


def reverse(_query: str, hits: list[Hit]) -> list[Hit]:
    return hits[::-1]


def test_rag_citations_inline_documents_and_index_reload(tmp_path, backend, embedder):
    store = LocalStore(tmp_path / "s3")
    store.ensure_bucket(BUCKET)
    assert publish_index(store, embedder, CORPUS_V1, tmp_path) == 1
    index = StackIndex(store, BUCKET, NAMESPACE, STACK, tmp_path / "index-cache", embedder, poll_seconds=0)
    rag = RagContext(embedder, index, k=3)
    service = service_for(
        backend,
        SessionStore(tmp_path / "s.db"),
        rag=rag,
        registry=lambda: load_registry(store, BUCKET, NAMESPACE, STACK),
    )
    client = TestClient(build_app(service))

    body = client.post(
        "/reasoning/chat", json={"prompt": "Why do bond prices fall when rates rise?", "max_tokens": 4}
    ).json()
    assert body["citations"][0]["id"] == "bonds-101"
    assert body["citations"][0]["origin"] == "index:v1"
    assert body["domain"] == "finance" and body["adapter"] == "finance" and body["domain_confidence"] > 0.4
    stored = client.get(f"/reasoning/conversations/{body['conversation_id']}").json()["messages"]
    assert stored[1]["citations"][0]["id"] == "bonds-101"

    inline = "The Zorblax accord was signed in 1999 by Quentin Marlowe in Lisbon."
    body = client.post(
        "/reasoning/chat",
        json={"prompt": "Who signed the Zorblax accord?", "rag_documents": [inline], "max_tokens": 4},
    ).json()
    assert body["citations"][0]["origin"] == "conversation"
    assert "Zorblax" in body["citations"][0]["text"]
    assert any(c["origin"] == "index:v1" for c in body["citations"])
    conversation = body["conversation_id"]
    # The document stays with its conversation; no_default_data leaves the stack index out.
    body = client.post(
        "/reasoning/chat",
        json={
            "prompt": "Where was the accord signed?",
            "conversation_id": conversation,
            "no_default_data": True,
            "max_tokens": 4,
        },
    ).json()
    assert body["citations"] and {c["origin"] for c in body["citations"]} == {"conversation"}

    # A new promoted index version is picked up without a restart.
    publish_index(store, embedder, {"munis-201": "Municipal bonds pay tax-exempt coupons to residents."}, tmp_path)
    assert client.get("/reasoning/experts").json()["index"] == {"active": 2, "target": 2}
    body = client.post("/reasoning/chat", json={"prompt": "Are municipal bond coupons taxed?", "max_tokens": 4}).json()
    assert body["citations"][0] == {**body["citations"][0], "id": "munis-201", "origin": "index:v2"}
    assert rag.index_version == 2 and not (tmp_path / "index-cache" / "v1").exists()

    # A reranker (e.g. the stack's cross-encoder) reorders the promoted index's fused candidates.
    publish_index(store, embedder, {**CORPUS_V1, "munis-201": "Municipal bonds pay tax-exempt coupons."}, tmp_path)
    plain = RagContext(embedder, StackIndex(store, BUCKET, NAMESPACE, STACK, tmp_path / "p", embedder, 0), k=4)
    reranked = StackIndex(store, BUCKET, NAMESPACE, STACK, tmp_path / "r", embedder, 0, reranker=reverse)
    order = [c.id for c in plain.retrieve("bond prices and rates")]
    assert len(order) == 4
    assert [c.id for c in RagContext(embedder, reranked, k=4).retrieve("bond prices and rates")] == order[::-1]

    prompt = augment("Q?", [rag.retrieve("municipal bonds")[0]])
    assert prompt.startswith("Context:\n[1] (munis-201) Municipal bonds") and prompt.endswith("Question: Q?")


def test_sessions_survive_a_restart_and_history_is_budgeted(tmp_path, backend):
    db = tmp_path / "sessions.db"
    sessions = SessionStore(db)
    client = TestClient(build_app(service_for(backend, sessions)))
    first = client.post(
        "/reasoning/chat", json={"prompt": "Hello there", "session_id": "alice", "max_tokens": 3}
    ).json()
    conversation = first["conversation_id"]
    second = client.post(
        "/reasoning/chat",
        json={"prompt": "Hello there", "session_id": "alice", "conversation_id": conversation, "max_tokens": 3},
    ).json()
    # The second turn carries the first one as history.
    assert second["prompt_tokens"] > first["prompt_tokens"]
    client.post("/reasoning/chat", json={"prompt": "Another topic", "session_id": "bob", "max_tokens": 2})
    sessions.close()

    restarted = SessionStore(db)
    client = TestClient(build_app(service_for(backend, restarted)))
    listed = client.get("/reasoning/conversations", params={"session_id": "alice"}).json()["conversations"]
    assert [c["conversation_id"] for c in listed] == [conversation]
    assert listed[0]["messages"] == 4 and listed[0]["title"] == "Hello there"
    assert len(client.get("/reasoning/conversations").json()["conversations"]) == 2
    messages = client.get(f"/reasoning/conversations/{conversation}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == second["response"]

    count = backend.count_tokens
    everything = restarted.history(conversation, 10_000, count)
    assert len(everything) == 4
    last_two = sum(count(f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}") for m in everything[2:])
    assert restarted.history(conversation, last_two, count) == everything[2:]
    assert client.get("/reasoning/conversations/nope").status_code == 404


def test_semantic_cache_hits_and_is_invalidated_by_new_versions(tmp_path, backend, embedder):
    cache = SemanticCache(embedder, threshold=0.9)
    client = TestClient(build_app(service_for(backend, SessionStore(tmp_path / "s.db"), cache=cache)))

    def counter(name: str) -> float:
        return cache.registry.get_sample_value(f"latentmas_semantic_cache_{name}_total") or 0.0

    ask = {"prompt": "What drives long-term bond returns?", "max_tokens": 5}
    first = client.post("/reasoning/chat", json=ask).json()
    assert first["cached"] is False
    again = client.post("/reasoning/chat", json={**ask, "prompt": "what drives long term bond returns"}).json()
    assert again["cached"] is True and again["cache_similarity"] >= 0.9
    assert again["response"] == first["response"] and again["conversation_id"] != first["conversation_id"]
    other = client.post("/reasoning/chat", json={**ask, "prompt": "How do courts enforce a contract?"}).json()
    assert other["cached"] is False
    assert (counter("hits"), counter("misses"), counter("invalidations")) == (1, 2, 0)

    backend.versions["finance"] = 2  # a promotion reached this replica
    try:
        after = client.post("/reasoning/chat", json=ask).json()
    finally:
        backend.versions["finance"] = 1
    assert after["cached"] is False
    assert after["versions"]["adapters"]["finance"] == 2
    assert (counter("hits"), counter("misses"), counter("invalidations")) == (1, 3, 1)
    # An index promotion invalidates too.
    versions = {"adapters": {"finance": 1}, "index": 1}
    cache.store("q", "s", versions, {"response": "a"})
    assert cache.lookup("q", "s", versions) is not None
    assert cache.lookup("q", "s", {**versions, "index": 2}) is None and len(cache) == 0


def test_pipeline_is_chosen_per_request_and_reported(tmp_path, backend):
    settings = ReasoningSettings(latent=LatentConfig(latent_steps=3))
    client = TestClient(build_app(service_for(backend, SessionStore(tmp_path / "s.db"), settings=settings)))
    ask = {"prompt": "Plan a bond ladder.", "max_tokens": 6}
    latent = client.post("/reasoning/chat", json={**ask, "pipeline": "latent"}).json()
    assert latent["agents"] == ["Planner", "Critic", "Refiner", "Judger"]
    assert latent["latent_steps"] == 9 and latent["cache_length"] > latent["prompt_tokens"]
    assert latent["adapter"] == "finance"
    text = client.post("/reasoning/chat", json={**ask, "pipeline": "text"}).json()
    assert text["latent_steps"] == 0 and text["generated_tokens"] > latent["generated_tokens"]
    single = client.post("/reasoning/chat", json={**ask, "pipeline": "single", "latent_steps": 1}).json()
    assert single["agents"] == ["Assistant"]
    stream = client.post("/reasoning/chat/stream", json={**ask, "pipeline": "latent", "keep_cache": "latent_only"})
    events = [line.removeprefix("event: ") for line in stream.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "meta" and events[-1] == "done" and set(events[1:-1]) <= {"token"}
    assert client.post("/reasoning/chat", json={**ask, "pipeline": "bogus"}).status_code == 400
