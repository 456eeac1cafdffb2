"""Field faults on the real server: non-finite adapters, one error body everywhere, OpenAI request
forms, numeric edge values, oversized bodies, probes during request work, and client disconnects."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from latentmas.testing.procs import eventually
from safetensors.torch import load_file, save_file

from tests.serving.conftest import Running, Stack, Toy

pytestmark = pytest.mark.serving
FINANCE = {"prompt": "what is the bond yield", "max_tokens": 6, "lora_adapter": "finance"}


def _poisoned(source: Path, folder: Path, value: float) -> Path:
    """A valid PEFT folder whose lora_B tensors all hold `value` (NaN or inf)."""
    shutil.copytree(source, folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(t, value) if "lora_B" in k else t for k, t in tensors.items()}, str(weights))
    return folder


def _is_error_body(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def _metric(running: Running, line: str) -> float:
    with running.client() as client:
        for row in client.get("/metrics").text.splitlines():
            if row.startswith(line + " "):
                return float(row.rsplit(" ", 1)[1])
    return 0.0


def test_non_finite_adapter_versions_are_refused_at_load(stack: Stack, toy: Toy, serve, tmp_path: Path) -> None:
    stack.publish("experts", "finance", toy.adapters["seed1"])
    running = serve(stack)
    with running.client() as client:
        v1_text = client.post("/generate", json=FINANCE).json()["response"]
        for i, value in enumerate((float("nan"), float("inf"))):
            bad = stack.publish("experts", "finance", _poisoned(toy.adapters["seed3"], tmp_path / f"bad{i}", value))

            def refused(bad: int = bad) -> bool:
                return bool(client.get("/adapters").json()["errors"].get("finance", {}).get("version") == bad)

            eventually(refused, 120, f"finance v{bad} refused")
            assert "lora_B holds non-finite values" in client.get("/adapters").json()["errors"]["finance"]["error"]
            answer = client.post("/generate", json=FINANCE).json()
            assert answer["lora"]["version"] == 1 and answer["response"] == v1_text
        assert client.get("/adapters").json()["active"] == {"finance": 1}
    assert _metric(running, "inference_adapter_reload_failures_total") == 2.0


def test_a_step_failure_ends_only_its_own_requests_with_a_json_500(routed: Stack, serve) -> None:
    """NaN written into finance's device slot at run time (after every load check): finance requests end
    with the JSON error, streamed ones in-band; base and legal requests sent with them succeed; the slot is
    quarantined and rewritten from the CPU tier for the next finance request."""
    running = serve(routed, routingMode="top1")
    server = running.server
    assert server.cache is not None and server.engine is not None
    with running.client() as client:
        assert client.post("/generate", json=FINANCE).status_code == 200  # puts finance in a slot
    slot = next(r["slot"] for r in server.cache.stats()["slots"]["resident"] if r["name"] == "finance")
    with server.engine.step_lock, torch.no_grad():
        for layer in server.engine.lora.layers.values():
            layer.lora_b.data[slot].fill_(float("nan"))

    async def mixed() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            bodies = [
                {**FINANCE, "temperature": 1.0},
                {**FINANCE, "lora_adapter": "base", "temperature": 1.0},
                {**FINANCE, "lora_adapter": "base"},
                {**FINANCE, "lora_adapter": "legal", "temperature": 0.7},
                FINANCE,
            ]
            engine = server.engine
            assert engine is not None
            with engine.step_lock:  # a step in progress: the five queue, then join one batch together
                posts = [asyncio.ensure_future(client.post("/generate", json=b)) for b in bodies]
                deadline = time.monotonic() + 60
                while engine.queued < len(bodies):
                    assert time.monotonic() < deadline, f"{engine.queued} of {len(bodies)} requests queued"
                    await asyncio.sleep(0.05)
            return await asyncio.gather(*posts)

    responses = asyncio.run(mixed())
    for failed in (responses[0], responses[4]):
        error = _is_error_body(failed, 500)
        assert error["type"] == "server_error" and "non-finite logits" in error["message"]
    assert [r.status_code for r in responses[1:4]] == [200, 200, 200], [r.text for r in responses]
    with server.engine.step_lock, torch.no_grad():  # corrupted again, after the quarantine healed it
        server.engine.lora.broken.discard(slot)
        for layer in server.engine.lora.layers.values():
            layer.lora_b.data[slot].fill_(float("nan"))
    with running.client() as client:
        chat = {"model": "finance", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=chat) as streamed:
            assert streamed.status_code == 200
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert '"error"' in events[-1] and "non-finite logits" in events[-1] and "[DONE]" not in events[-1]
        assert client.post("/generate", json={**FINANCE, "lora_adapter": "legal"}).status_code == 200
        # the quarantined slot is rewritten from the CPU copy by the next request that needs it
        assert client.post("/generate", json=FINANCE).status_code == 200
    assert _metric(running, 'inference_requests_total{endpoint="generate",status="error"}') == 2.0
    assert _metric(running, 'inference_requests_total{endpoint="chat",status="error"}') == 1.0


def test_every_error_is_the_documented_json_body(routed: Stack, serve) -> None:
    running = serve(routed, maxTokens=16, maxPromptTokens=60)
    with running.client() as client:
        cases: list[tuple[str, str, Any, int, str | None]] = [
            ("POST", "/generate", {"prompt": "hi", "max_tokens": 17}, 400, "max_tokens"),
            ("POST", "/generate", {"prompt": "hi", "lora_adapter": "nope"}, 404, "model"),
            ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
            ("GET", "/no/such/path", None, 404, None),
            ("PUT", "/generate", None, 405, None),
            ("DELETE", "/adapters/nope", None, 404, None),
            ("POST", "/adapters/nope", {"version": 3}, 404, None),
        ]
        for method, path, body, status, param in cases:
            error = _is_error_body(client.request(method, path, json=body), status)
            assert error["param"] == param, (path, error)
        raw = client.post("/generate", content=b"{broken", headers={"content-type": "application/json"})
        _is_error_body(raw, 400)


def test_openai_usage_chunk_and_content_parts(routed: Stack, serve) -> None:
    running = serve(routed)
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused")
    parts: Any = [{"type": "text", "text": "what is"}, {"type": "text", "text": "the bond yield"}]
    as_parts: Any = client.chat.completions.create(
        model="finance", messages=[{"role": "user", "content": parts}], max_tokens=6
    )
    joined: Any = client.chat.completions.create(
        model="finance", messages=[{"role": "user", "content": "what is\nthe bond yield"}], max_tokens=6
    )
    assert as_parts.choices[0].message.content == joined.choices[0].message.content
    system_parts: Any = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]}, *joined_messages()]
    assert client.chat.completions.create(model="base", messages=system_parts, max_tokens=2).choices
    chunks: list[Any] = list(
        client.chat.completions.create(
            model="finance",
            messages=[{"role": "user", "content": parts}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == as_parts.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == as_parts.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == as_parts.choices[0].message.content
    plain: list[Any] = list(
        client.chat.completions.create(model="finance", messages=joined_messages(), max_tokens=3, stream=True)
    )
    assert all(c.choices for c in plain) and all(getattr(c, "usage", None) is None for c in plain)
    for part in (
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
    ):
        with pytest.raises(openai.BadRequestError, match=f"parts of type '{part['type']}' are not supported"):
            mixed: Any = [{"role": "user", "content": [parts[0], part]}]
            client.chat.completions.create(model="finance", messages=mixed, max_tokens=2)


def joined_messages() -> list[Any]:
    return [{"role": "user", "content": "what is\nthe bond yield"}]


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_numeric_edge_values_are_handled_or_refused_naming_the_field(routed: Stack, serve, path: str) -> None:
    running = serve(routed, maxTokens=16)

    def body(**fields: Any) -> dict[str, Any]:
        if path == "/generate":
            return {"prompt": "the court ruling", "max_tokens": 3, **fields}
        return {"messages": [{"role": "user", "content": "the court ruling"}], "max_tokens": 3, **fields}

    refused: dict[str, list[Any]] = {
        "router_temperature": [1e-40, 5e-324, 2.2e-308, 1e308, 0.0, -1.0],
        "temperature": [-5e-324, 1e10, -1.0],
        "top_p": [0.0, -5e-324, 1.0000001],
        "top_k": [-1, 10**30],
        "max_tokens": [0, 17, 10**30, -(10**30), 2.5],
        "stop": [["a", "b", "c", "d", "e"], "x" * 257],
    }
    if path == "/v1/chat/completions":
        refused["max_completion_tokens"] = [0, 17, 10**30]
        refused["n"] = [0, 2, 1.5]
    handled = [
        {"router_temperature": 1e-3},
        {"router_temperature": 1e4},
        {"temperature": 5e-324, "top_p": 5e-324},
        {"temperature": 1e-40},
        {"temperature": 5.0, "top_k": 1},
        {"top_k": 10**6},
        {"max_tokens": 16.0},  # JSON Schema's integer includes 16.0
    ]
    with running.client() as client:
        for field, values in refused.items():
            for value in values:
                error = _is_error_body(client.post(path, json=body(**{field: value})), 400)
                assert error["param"] == field, (field, value, error)
        for raw in (b"NaN", b"Infinity", b"-Infinity"):
            payload = httpx.Request("POST", "/", json=body(temperature=0.5)).content.replace(b"0.5", raw)
            response = client.post(path, content=payload, headers={"content-type": "application/json"})
            assert _is_error_body(response, 400)["param"] == "temperature"
        for fields in handled:
            response = client.post(path, json=body(**fields))
            assert response.status_code == 200, (fields, response.text)


def test_oversized_bodies_and_prompts_are_refused_before_tokenisation(routed: Stack, serve) -> None:
    running = serve(routed, maxPromptTokens=60)  # the default system prompt alone is about 25 tokens
    gate = _Gate(running)
    gate.release.set()
    with running.client() as client:
        huge = "word " * (1 << 20)  # 5 MB, the field report's size
        for path, body in (
            ("/generate", {"prompt": huge}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
        ):
            error = _is_error_body(client.post(path, json=body), 413)
            assert "exceeds 1048576 bytes" in error["message"]
        chunked = client.post(  # no Content-Length: counted while reading
            "/generate",
            content=iter([b'{"prompt": "', b"x" * (1 << 20), b'"}']),
            headers={"content-type": "application/json"},
        )
        _is_error_body(chunked, 413)
        long_prompt = "word " * 400  # fits the body limit, not 60 tokens x 32 characters
        error = _is_error_body(client.post("/generate", json={"prompt": long_prompt}), 400)
        assert error["param"] == "prompt" and "the limit is 1920" in error["message"]
        error = _is_error_body(client.post("/generate", json={"prompt": "hi", "system_prompt": long_prompt}), 400)
        assert error["param"] == "system_prompt"
        parts = [{"type": "text", "text": "x" * 1000}, {"type": "text", "text": "y" * 1000}]
        messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": parts}]
        error = _is_error_body(client.post("/v1/chat/completions", json={"messages": messages}), 400)
        assert error["param"] == "messages.1.content"
        assert gate.calls == 0  # none of these reached the tokenizer
        tokens = _is_error_body(client.post("/generate", json={**FINANCE, "prompt": "word " * 60}), 413)
        assert tokens["param"] == "prompt" and "the limit is 60" in tokens["message"]  # short, but 60+ tokens
        assert gate.calls == 1  # the gate really sits on the request's tokenisation
        assert client.post("/generate", json={**FINANCE, "prompt": "hi"}).status_code == 200


def test_a_request_larger_than_the_kv_budget_alone_gets_a_413_naming_the_limit(routed: Stack, serve) -> None:
    running = serve(routed, kvBudgetTokens=80)
    with running.client() as client:
        error = _is_error_body(client.post("/generate", json={**FINANCE, "max_tokens": 79}), 413)
        assert error["param"] == "max_tokens"
        assert "exceeds the KV budget of 80 tokens (inference.kvBudgetTokens)" in error["message"]
        assert client.post("/generate", json={**FINANCE, "max_tokens": 4}).status_code == 200


class _Gate:
    """Wraps the server's real tokenizer so a test can hold a request inside tokenisation."""

    def __init__(self, running: Running) -> None:
        runtime = running.server.runtime
        assert runtime is not None
        self.tokenizer: Any = runtime.tokenizer
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        runtime.tokenizer = self  # type: ignore[assignment]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(180)
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_probes_answer_while_a_request_is_held_inside_tokenisation(routed: Stack, serve) -> None:
    running = serve(routed)
    gate = _Gate(running)
    outcome: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            httpx.post(running.url + "/generate", json={**FINANCE, "max_tokens": 2}, timeout=300)
        )
    )
    worker.start()
    assert gate.entered.wait(120)
    with running.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 200
        assert client.get("/adapters").status_code == 200
        assert client.post("/generate", json={"prompt": "x" * (2 << 20)}).status_code == 413
    assert worker.is_alive() and not outcome  # the request is still inside tokenisation
    gate.release.set()
    worker.join(180)
    assert outcome[0].status_code == 200


def _raw_request(url: str, path: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


@pytest.mark.parametrize(("path", "endpoint"), [("/generate", "generate"), ("/v1/chat/completions", "chat")])
def test_client_disconnects_are_counted_as_their_own_status(routed: Stack, serve, path: str, endpoint: str) -> None:
    """The engine is held (its step lock) so the request is surely still running when the client goes; the
    request is cancelled at once (its engine row freed) and counted as `disconnected`, not `error`."""
    running = serve(routed)
    server = running.server
    assert server.engine is not None
    body = (
        b'{"prompt": "hi", "lora_adapter": "base", "max_tokens": 8}'
        if endpoint == "generate"
        else b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
    )
    line = f'inference_requests_total{{endpoint="{endpoint}",status="disconnected"}}'
    with server.engine.step_lock:  # nothing decodes until the client has gone
        sock = _raw_request(running.url, path, body)
        eventually(lambda: server.in_flight == 1, 120, "the request admitted")
        sock.close()
        eventually(lambda: _metric(running, line) == 1.0, 120, "the disconnect counted")
    idle = lambda: server.in_flight == 0 and server.engine is not None and server.engine.active == 0  # noqa: E731
    eventually(idle, 120, "no rows")
    assert _metric(running, f'inference_requests_total{{endpoint="{endpoint}",status="error"}}') == 0.0
