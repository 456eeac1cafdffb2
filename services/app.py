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
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from latentmas.services.api_models import ChatCompletionRequest, GenerateRequest, PinRequest
from latentmas.services.http_errors import (
    ClientGone,
    body_limit,
    error_body,
    error_response,
    install_error_handlers,
    openapi_with_errors,
    responses,
    unless_disconnected,
)
from latentmas.services.server import (
    AUTO,
    CHARS_PER_TOKEN,
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
from pydantic import BaseModel, Field

T = TypeVar("T")

# The UI page and its assets load without a token; the page then sends the token the user enters.
OPEN_PATHS = ("/health", "/ready", "/metrics", "/", "/ui/app.js", "/ui/style.css")
GENERATION_ERRORS = responses(400, 404, 413, 429, 500, 503)


def _auth_middleware(token: str) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    expected = f"Bearer {token}"

    async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path in OPEN_PATHS or secrets.compare_digest(request.headers.get("authorization", ""), expected):
            return await call_next(request)
        return error_response(401, "missing or wrong bearer token")

    return check


def server_of(request: Request) -> InferenceServer:
    server: InferenceServer = request.app.state.engine
    return server


async def _first_event(stream: AsyncGenerator[StreamEvent, None]) -> StreamEvent:
    """Runs the request up to routing/admission, so refusals become HTTP errors before streaming starts."""
    return await stream.__anext__()


REFUSALS = (RequestError, Overloaded, NotReady)


def _observe(server: InferenceServer, endpoint: str, started: float, status: str) -> None:
    server.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    server.metrics.requests.labels(endpoint, status).inc()


def _outcome(err: BaseException) -> str:
    """The `status` label of a request that ended with `err`."""
    if isinstance(err, ClientGone | asyncio.CancelledError):
        return "disconnected"
    return "refused" if isinstance(err, REFUSALS) else "error"


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


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
        "usage": _usage(result),
        "latentmas": result.routing_info(),
    }


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _chunk(request_id: str, model: str, choices: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    body = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }
    return _sse(body)


def _within_cap(body: ChatCompletionRequest, cap: int) -> None:
    """Both token fields obey the cap (the one not used for sampling too: the document says so)."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name)
        if value is not None and value > cap:
            raise RequestError(f"{name} {value} exceeds the server cap {cap}", param=name)


def _choice(delta: dict[str, str], reason: str | None) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": delta, "finish_reason": reason}]


def _stream_error(err: Exception) -> str:
    """An error after streaming began: OpenAI's error object as the last event (the status is already 200)."""
    status = err.status if isinstance(err, RequestError) else 500
    return _sse(error_body(status, str(err) or type(err).__name__))


class ReadyBody(BaseModel):
    ready: bool
    versions: dict[str, int | None]
    error: str | None = Field(None, description="Why the server is not ready yet.")
    registry_error: dict[str, Any] | None = Field(
        None, description="Why the latest registry read was not applied (the last good revision keeps serving)."
    )


SSE = {
    "text/event-stream": {
        "schema": {"anyOf": [{"type": "object"}, {"type": "string"}], "description": "chunks, then [DONE]"}
    }
}


def request_limits(server: InferenceServer) -> dict[str, dict[str, int]]:
    """The server's caps on request fields, for the OpenAPI document."""
    spec = server.spec
    tokens = spec.max_tokens
    window = getattr(server.model.config, "max_position_embeddings", None) if server.engine else None
    if window:
        tokens = min(tokens, window - 1)
    chars = spec.max_prompt_tokens * CHARS_PER_TOKEN
    return {
        "max_tokens": {"maximum": tokens},
        "max_completion_tokens": {"maximum": tokens},
        "prompt": {"maxLength": chars},
        "system_prompt": {"maxLength": chars},
        "content": {"maxLength": chars},
        "text": {"maxLength": chars},
    }


def inference_router() -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready", response_model=ReadyBody, responses={503: {"model": ReadyBody, "description": "Not ready."}})
    async def ready(request: Request) -> JSONResponse:
        server = server_of(request)
        body = ReadyBody(
            ready=server.ready,
            versions=server.versions(),
            error=server.startup_error,
            registry_error=server.reloader.registry_error,
        )
        return JSONResponse(body.model_dump(), status_code=200 if server.ready else 503)

    @api.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
    )
    async def metrics(request: Request) -> Response:
        return PlainTextResponse(generate_latest(server_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server = server_of(request)
        created = int(time.time())
        names = list(dict.fromkeys([AUTO, "base", *sorted(server.cache.active if server.cache else {})]))
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": server.settings.stack} for name in names
            ],
        }

    @api.post(
        "/v1/chat/completions",
        response_model=None,
        responses={
            **GENERATION_ERRORS,
            200: {"description": "A chat.completion, or SSE chunks when streaming", "content": SSE},
        },
    )
    async def chat(body: ChatCompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        server = server_of(request)
        started = time.monotonic()
        generation = GenerationRequest(
            messages=[{"role": m.role, "content": m.text()} for m in body.messages],
            params=body.sampling(server.spec.max_tokens),
            adapter=body.model,
            router_temperature=body.router_temperature,
        )
        stream = server.stream(generation)
        try:
            _within_cap(body, server.spec.max_tokens)
            start = await unless_disconnected(request, _first_event(stream))
            assert start.result is not None
            if not body.stream:
                result = await unless_disconnected(request, _drain(stream))
                _observe(server, "chat", started, "ok")
                return _chat_body(result, body.model)
        except BaseException as err:
            await stream.aclose()
            _observe(server, "chat", started, _outcome(err))
            raise
        request_id = start.result.request_id
        usage = bool(body.stream_options and body.stream_options.include_usage)
        extra: dict[str, Any] = {"usage": None} if usage else {}

        async def events() -> AsyncIterator[str]:
            status = "disconnected"  # unless the stream ends on its own below
            first = True
            try:
                yield _chunk(request_id, body.model, _choice({"role": "assistant", "content": ""}, None), extra)
                async for event in stream:
                    if event.kind == "text":
                        if first:
                            server.metrics.first_token.observe(time.monotonic() - started)
                            first = False
                        yield _chunk(request_id, body.model, _choice({"content": event.text}, None), extra)
                    elif event.kind == "done" and event.result is not None:
                        result = event.result
                        routing = {"latentmas": result.routing_info()}
                        yield _chunk(request_id, body.model, _choice({}, result.finish_reason), {**extra, **routing})
                        if usage:
                            yield _chunk(request_id, body.model, [], {"usage": _usage(result)})
                status = "ok"
                yield "data: [DONE]\n\n"
            except Exception as err:  # the stream has started: report the failure in-band
                status = _outcome(err)
                yield _stream_error(err)
            finally:
                await stream.aclose()
                _observe(server, "chat", started, status)

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/generate", responses=GENERATION_ERRORS)
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
            result = await unless_disconnected(request, server.generate(generation))
        except BaseException as err:
            _observe(server, "generate", started, _outcome(err))
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

    @api.post("/adapters/reload", responses=responses(409, 503))
    async def reload(request: Request) -> dict[str, Any]:
        return await _in_thread(server_of(request).reload)

    @api.post("/adapters/{name}", responses=responses(404, 503))
    async def pin(name: str, request: Request, body: PinRequest | None = None) -> dict[str, Any]:
        server = server_of(request)
        registry = server.reloader.registry
        entry = registry.experts.get(name) if registry else None
        version = body.version if body and body.version else (entry.current if entry else None)
        if version is None:
            raise RequestError(f"adapter {name!r} is not in the registry", 404)
        await _in_thread(lambda: server.pin(name, version))
        return server.adapters()

    @api.delete("/adapters/{name}", responses=responses(404))
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


async def _in_thread(fn: Callable[[], T]) -> T:
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
    install_error_handlers(app)
    if settings.auth_token:
        app.middleware("http")(_auth_middleware(settings.auth_token))
    app.add_middleware(body_limit, limit=settings.max_body_bytes)
    app.include_router(inference_router())
    for router in _extra_routers(settings.routers):
        app.include_router(router)
    app.openapi = openapi_with_errors(  # type: ignore[method-assign]
        app, OPEN_PATHS, auth=bool(settings.auth_token), limits=lambda: request_limits(server)
    )
    return app
