"""One error shape for every HTTP error the service returns, the request body limit, and the OpenAPI
document that declares them.

Every error body is `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape; `code` is the
HTTP status, `param` the offending field or null): refusals raised by the server, request validation,
routing errors (404/405), the body limit (413), 429 (with `Retry-After`), 503, and any unexpected
exception (500, logged with its traceback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any, TypeVar

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from latentmas.services.api_models import ErrorBody
from latentmas.services.server import GenerationFailed, NotReady, Overloaded, RequestError, StorageUnavailable
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")
RETRY_AFTER_SECONDS = 1
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
}
DESCRIPTIONS = {
    400: "Invalid request (the message names the field).",
    401: "Missing or wrong bearer token.",
    404: "Unknown model, adapter, version or path.",
    405: "Method not allowed.",
    409: "The registry read was refused; the last good revision keeps serving.",
    413: "Request body above the server's limit, or a prompt beyond maxPromptTokens or the context window.",
    429: "Too many requests in flight or no adapter slot free; retry after `Retry-After` seconds.",
    500: "This request failed inside the server.",
    502: "A dependency answered with an error.",
    503: "Not ready yet, or object storage unreachable.",
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": status}}


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can return."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (and freeing its engine row) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    raise ClientGone()


UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def field_path(loc: Sequence[int | str]) -> str | None:
    """`messages.0.content` from a pydantic error location: without the leading `body`/`query` and the
    union member tags (`constrained-str`, `list[TextPart]`, `function-before[...]`)."""
    kept = [str(p) for p in loc[1:] if isinstance(p, int) or not (set(p) & set("-[(") or p in UNION_TAGS)]
    return ".".join(kept) or None


def install_error_handlers(app: FastAPI) -> None:
    async def invalid(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        errors = err.errors()
        parts = dict.fromkeys(f"{field_path(e['loc']) or 'body'}: {e['msg']}" for e in errors)
        return error_response(400, "; ".join(parts), field_path(errors[0]["loc"]) if errors else None)

    async def refused(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestError)
        return error_response(err.status, str(err), err.param)

    async def overloaded(_: Request, err: Exception) -> JSONResponse:
        return error_response(429, str(err), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    async def not_ready(_: Request, err: Exception) -> JSONResponse:
        return error_response(503, f"not ready: {err}")

    async def unavailable(_: Request, err: Exception) -> JSONResponse:
        return error_response(503, str(err))

    async def failed(_: Request, err: Exception) -> JSONResponse:
        return error_response(500, str(err))

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, StarletteHTTPException)
        headers = dict(err.headers or {})
        if err.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(err.status_code, str(err.detail), headers=headers)

    async def gone(_: Request, __: Exception) -> JSONResponse:
        return error_response(400, "the client disconnected")  # nobody reads it: the connection is closed

    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # Starlette still logs the traceback
        return error_response(500, f"internal error: {type(err).__name__}: {err}")

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(NotReady, not_ready)
    app.add_exception_handler(StorageUnavailable, unavailable)
    app.add_exception_handler(GenerationFailed, failed)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientGone, gone)
    app.add_exception_handler(Exception, unexpected)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


def body_limit(app: ASGIApp, limit: int) -> ASGIApp:
    """ASGI middleware: 413 for a body above `limit` bytes, by Content-Length before reading anything,
    or while reading a body sent without one; no route ever sees more than `limit` bytes."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            body = json.dumps(error_body(413, f"request body of {int(length)} bytes exceeds {limit} bytes")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await app(scope, counted, send)

    return limited


def openapi_with_errors(
    app: FastAPI, open_paths: tuple[str, ...], auth: bool, limits: Callable[[], dict[str, dict[str, int]]]
) -> Callable[[], dict[str, Any]]:
    """The app's OpenAPI document, true to what the server does: 400 instead of FastAPI's 422; 413 and
    500 on every route, 401 where a token is required (when auth is on); and the server's own caps
    (`limits()`: property -> {"maximum" | "maxLength": n}, e.g. max_tokens <= spec.inference.maxTokens)
    folded into every request schema, so a request the document calls valid is never refused for size."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        error_ref = {"$ref": "#/components/schemas/ErrorBody"}
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas["ErrorBody"] = body
        caps = limits()
        for component in schemas.values():
            for name, fields in (component.get("properties") or {}).items():
                for keyword, cap in caps.get(name, {}).items():
                    _cap(fields, keyword, cap)
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                declared = operation.setdefault("responses", {})
                declared.pop("422", None)
                wanted = [400, 413, 500] + ([401] if auth and path not in open_paths else [])
                for status in wanted:
                    declared.setdefault(
                        str(status),
                        {"description": DESCRIPTIONS[status], "content": {"application/json": {"schema": error_ref}}},
                    )
        app.openapi_schema = schema
        return schema

    return build


def _cap(schema: dict[str, Any], keyword: str, cap: int) -> None:
    """Lowers `keyword` (maximum / maxLength) to `cap` wherever it applies in a property's schema."""
    kinds = {"maximum": "integer", "maxLength": "string"}
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == kinds[keyword]:
            option[keyword] = min(cap, option.get(keyword, cap))
