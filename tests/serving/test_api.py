"""The HTTP API on the real server (uvicorn) with a registry in the real MinIO."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from tests.serving.conftest import Stack

pytestmark = pytest.mark.serving


def test_openai_client_chat_models_and_streaming(routed: Stack, serve) -> None:
    running = serve(routed)
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused")
    assert {m.id for m in client.models.list().data} == {"auto", "base", "finance", "legal"}
    messages = [{"role": "user", "content": "what is the bond yield"}]
    reply: Any = client.chat.completions.create(model="finance", messages=messages, max_tokens=8)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    routing = reply.model_extra["latentmas"]
    assert routing["experts"] == [{"name": "finance", "version": 1, "weight": 1.0}]
    assert routing["reason"] == "explicit"
    chunks: list[Any] = list(
        client.chat.completions.create(model="finance", messages=messages, max_tokens=8, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: streaming yields the same text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].model_extra["latentmas"]["experts"][0]["name"] == "finance"
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="nope", messages=messages, max_tokens=4)


def test_router_picks_an_expert_and_low_confidence_falls_back_to_base(routed: Stack, serve) -> None:
    running = serve(routed, confidenceThreshold=0.6, routingMode="top1")
    with running.client() as client:
        routed_answer = client.post("/generate", json={"prompt": "the court ruling", "max_tokens": 4}).json()
        assert routed_answer["domain"] == "legal"
        assert routed_answer["lora"] == {"name": "legal", "version": 1, "loaded": True}
        assert routed_answer["domain_confidence"] > 0.99
        # a huge router temperature flattens the gates to 50/50, below the 0.6 threshold: the base answers
        flat = client.post(
            "/generate", json={"prompt": "the court ruling", "max_tokens": 4, "router_temperature": 1000}
        ).json()
        assert flat["domain"] == "general" and flat["lora"] is None and flat["model"] == "base"
        assert flat["routing"]["reason"] == "low_confidence"
        # system turns only: nothing for the router to read, the base answers (it used to be a 500)
        system_only = client.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "system", "content": "be brief"}], "max_tokens": 2},
        )
        assert system_only.status_code == 200, system_only.text
        assert system_only.json()["latentmas"]["reason"] == "no_question"
        listed = client.post("/generate", json={"prompt": "hello", "max_tokens": 2, "list_loras": True}).json()
        assert listed["loras"] == {"finance": 1, "legal": 1}
        assert listed["session_id"] and listed["conversation_id"]
        explicit = client.post(
            "/generate", json={"prompt": "hi", "lora_adapter": "finance", "session_id": "s1", "max_tokens": 2}
        ).json()
        assert explicit["model"] == "finance" and explicit["session_id"] == "s1"


def test_bad_requests_get_clear_4xx(routed: Stack, serve) -> None:
    running = serve(routed, maxTokens=16, maxPromptTokens=60)  # the default system prompt takes ~30 of them
    with running.client() as client:
        cases = [
            ({}, 400, "prompt"),
            ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
            ({"prompt": "hi", "max_tokens": 17}, 400, "exceeds the server cap 16"),
            ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
            ({"prompt": " ".join(["word"] * 40)}, 413, "the limit is 60"),
            ({"prompt": "hi", "lora_adapter": "missing"}, 404, "unknown model/adapter 'missing'"),
        ]
        for body, status, message in cases:
            response = client.post("/generate", json=body)
            assert response.status_code == status, (body, response.text)
            assert message in response.json()["error"]["message"]
        bad_json = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400
        no_messages = client.post("/v1/chat/completions", json={"model": "auto", "messages": []})
        assert no_messages.status_code == 400 and "messages" in no_messages.json()["error"]["message"]
        assert client.delete("/adapters/missing").status_code == 404
        assert client.post("/adapters/missing", json={}).status_code == 404


def test_bearer_auth_and_concurrency_limit_429(routed: Stack, serve) -> None:
    running = serve(routed, maxConcurrentRequests=2)
    open_client = httpx.Client(base_url=running.url, timeout=30)
    assert open_client.get("/health").status_code == 200  # probes stay open
    running_token = serve(routed, token="s3cret", maxConcurrentRequests=2)
    with httpx.Client(base_url=running_token.url) as anonymous:
        denied = anonymous.post("/generate", json={"prompt": "hi"})
        assert denied.status_code == 401 and "bearer" in denied.json()["error"]["message"]
        assert anonymous.get("/ready").status_code == 200
    with running_token.client() as client:
        assert client.post("/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            body = {"prompt": "hello world", "max_tokens": 120, "lora_adapter": "finance"}
            return await asyncio.gather(*(client.post("/generate", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
    open_client.close()


def test_metrics_and_adapter_listing(routed: Stack, serve) -> None:
    running = serve(routed)
    with running.client() as client:
        for name in ("finance", "legal", "base", "auto"):
            assert client.post("/generate", json={"prompt": "hi", "max_tokens": 3, "lora_adapter": name}).is_success
        listing = client.get("/adapters").json()
        assert listing["active"] == {"finance": 1, "legal": 1}
        assert listing["versions"]["router"] == 1 and listing["versions"]["base"] == 1
        cache = listing["cache"]
        assert cache["slots"]["total"] == 4 and cache["slots"]["used"] == 2
        assert cache["slots"]["bytes_per_slot"] > 0 and cache["cpu"]["bytes"] > 0 and cache["disk"]["bytes"] > 0
        text = client.get("/metrics").text
    for name in (
        "inference_latency_seconds_bucket",
        "inference_tokens_total",
        "inference_batch_size_bucket",
        "inference_adapter_events_total",
        "inference_adapter_reload_seconds_count",
        "inference_requests_total",
    ):
        assert name in text, name
    assert 'inference_adapter_events_total{event="load"} 2.0' in text
    assert 'inference_requests_total{endpoint="generate",status="ok"} 4.0' in text
