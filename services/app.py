"""The HTTP API: OpenAI-compatible chat completions, the simple JSON `/generate`, adapter management,
health/readiness and Prometheus metrics. `app.state.engine` is the InferenceServer other routers use."""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from latentmas.services.api_models import ChatCompletionRequest, GenerateRequest, PinRequest
from latentmas.services.server import (
    AUTO,
    GenerationRequest,
    GenerationResult,
    InferenceServer,
    NotReady,
    Overloaded,
    RequestError,
    StreamEvent,
)
from latentmas.services.settings import ServeSettings
from latentmas.store import ObjectStore
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

# The UI page and its assets load without a token; the page then sends the token the user enters.
OPEN_PATHS = ("/health", "/ready", "/metrics", "/", "/ui/app.js", "/ui/style.css")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    async def invalid(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()]
        return _error(400, "; ".join(parts), "invalid_request_error")

    async def refused(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestError)
        return _error(err.status, str(err), "invalid_request_error" if err.status == 400 else "not_found_error")

    async def overloaded(_: Request, err: Exception) -> JSONResponse:
        return _error(429, str(err), "rate_limit_error")

    async def not_ready(_: Request, err: Exception) -> JSONResponse:
        return _error(503, f"not ready: {err}", "service_unavailable")

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(NotReady, not_ready)


def _auth_middleware(token: str) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    expected = f"Bearer {token}"

    async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path in OPEN_PATHS or secrets.compare_digest(request.headers.get("authorization", ""), expected):
            return await call_next(request)
        return _error(401, "missing or wrong bearer token", "authentication_error")

    return check


def server_of(request: Request) -> InferenceServer:
    server: InferenceServer = request.app.state.engine
    return server


async def _first_event(stream: AsyncGenerator[StreamEvent, None]) -> StreamEvent:
    """Runs the request up to routing/admission, so refusals become HTTP errors before streaming starts."""
    return await stream.__anext__()


def _observe(server: InferenceServer, endpoint: str, started: float, status: str) -> None:
    server.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    server.metrics.requests.labels(endpoint, status).inc()


def _chat_body(result: GenerationResult, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
        "latentmas": result.routing_info(),
    }


def _chunk(request_id: str, model: str, delta: dict[str, str], reason: str | None, extra: dict[str, Any]) -> str:
    body = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


def inference_router() -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        server = server_of(request)
        body = {"ready": server.ready, "versions": server.versions(), "error": server.startup_error}
        return JSONResponse(body, status_code=200 if server.ready else 503)

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        return PlainTextResponse(generate_latest(server_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server = server_of(request)
        created = int(time.time())
        names = [AUTO, "base", *sorted(server.cache.active if server.cache else {})]
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": server.settings.stack} for name in names
            ],
        }

    @api.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        server = server_of(request)
        started = time.monotonic()
        generation = GenerationRequest(
            messages=[m.model_dump() for m in body.messages],
            params=body.sampling(server.spec.max_tokens),
            adapter=body.model,
            router_temperature=body.router_temperature,
        )
        stream = server.stream(generation)
        try:
            start = await _first_event(stream)
        except Exception:
            _observe(server, "chat", started, "refused")
            raise
        assert start.result is not None
        request_id = start.result.request_id
        if not body.stream:
            result = await _drain(stream)
            _observe(server, "chat", started, "ok")
            return _chat_body(result, body.model)

        async def events() -> AsyncIterator[str]:
            status = "error"
            first = True
            try:
                yield _chunk(request_id, body.model, {"role": "assistant", "content": ""}, None, {})
                async for event in stream:
                    if event.kind == "text":
                        if first:
                            server.metrics.first_token.observe(time.monotonic() - started)
                            first = False
                        yield _chunk(request_id, body.model, {"content": event.text}, None, {})
                    elif event.kind == "done" and event.result is not None:
                        extra = {"latentmas": event.result.routing_info()}
                        yield _chunk(request_id, body.model, {}, event.result.finish_reason, extra)
                status = "ok"
                yield "data: [DONE]\n\n"
            finally:
                await stream.aclose()
                _observe(server, "chat", started, status)

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
        server = server_of(request)
        started = time.monotonic()
        generation = GenerationRequest(
            prompt=body.prompt,
            system_prompt=body.system_prompt,
            params=body.sampling(server.spec.max_tokens),
            adapter=body.lora_adapter or AUTO,
            router_temperature=body.router_temperature,
        )
        try:
            result = await server.generate(generation)
        except Exception:
            _observe(server, "generate", started, "refused")
            raise
        _observe(server, "generate", started, "ok")
        top = max(result.experts, key=lambda e: e[2]) if result.experts else None
        answer: dict[str, Any] = {
            "response": result.text,
            "domain": top[0] if top else "general",
            "domain_confidence": result.route.confidence,
            "model": top[0] if top else "base",
            "session_id": body.session_id or uuid.uuid4().hex,
            "conversation_id": body.conversation_id or uuid.uuid4().hex,
            "lora": {"name": top[0], "version": top[1], "loaded": True} if top else None,
            "routing": result.routing_info(),
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
        }
        if body.list_loras:
            answer["loras"] = server.adapters()["active"]
        return answer

    @api.get("/adapters")
    async def adapters(request: Request) -> dict[str, Any]:
        return server_of(request).adapters()

    @api.post("/adapters/reload")
    async def reload(request: Request) -> dict[str, Any]:
        return await _in_thread(server_of(request).reload)

    @api.post("/adapters/{name}")
    async def pin(name: str, request: Request, body: PinRequest | None = None) -> dict[str, Any]:
        server = server_of(request)
        registry = server.reloader.registry
        entry = registry.experts.get(name) if registry else None
        version = body.version if body and body.version else (entry.current if entry else None)
        if version is None:
            raise RequestError(f"adapter {name!r} is not in the registry", 404)
        await _in_thread(lambda: server.pin(name, version))
        return server.adapters()

    @api.delete("/adapters/{name}")
    async def unload(name: str, request: Request) -> dict[str, Any]:
        server = server_of(request)
        server.unload(name)
        return server.adapters()

    return api


async def _drain(stream: AsyncGenerator[StreamEvent, None]) -> GenerationResult:
    async for event in stream:
        if event.kind == "done" and event.result is not None:
            return event.result
    raise RuntimeError("generation ended without a result")


async def _in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


def _extra_routers(names: tuple[str, ...]) -> list[APIRouter]:
    """Routers other modules provide (e.g. the reasoning API); a module that does not exist is skipped."""
    routers = []
    for spec in names:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        routers.append(getattr(module, attr))
    return routers


def create_app(settings: ServeSettings, store: ObjectStore | None = None) -> FastAPI:
    """The serving app. The server starts loading in the background at startup; /ready says when done."""
    server = InferenceServer(settings, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="LatentMAS inference", lifespan=lifespan)
    app.state.engine = server
    _install_error_handlers(app)
    if settings.auth_token:
        app.middleware("http")(_auth_middleware(settings.auth_token))
    app.include_router(inference_router())
    for router in _extra_routers(settings.routers):
        app.include_router(router)
    return app
