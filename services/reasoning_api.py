"""The reasoning layer's HTTP surface, as an APIRouter the serving app mounts: chat (JSON or
streamed server-sent events) through the selected pipeline with RAG, sessions and the semantic
cache; conversations; experts with active/target versions; the evolution trigger; the web UI at `/`.

It needs only a little from the serving engine, stated as `ReasoningBackend`, so the engine stays
the owner of the model (its lock, its adapters); `ServerBackend` implements it on the serving
InferenceServer. No `from __future__ import annotations` here: FastAPI must evaluate the dependency
annotation that `create_reasoning_router` defines locally."""

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from latentmas.registry import Registry
from latentmas.services.agent_prompts import DEFAULT_PROMPTS, AnswerFormat, PromptSet, prompts_from_spec
from latentmas.services.api_models import integral
from latentmas.services.detokenize import StreamDetokenizer
from latentmas.services.engine_work import Program, drive
from latentmas.services.http_errors import error_body, responses
from latentmas.services.latent_batch import BatchKey, LatentBatcher
from latentmas.services.latent_pipeline import CacheKeep, LatentConfig, Positions, run_pipeline, with_adapter
from latentmas.services.rag_context import Citation, RagContext, StackIndex, augment
from latentmas.services.semantic_cache import SemanticCache
from latentmas.services.sessions import SessionStore, UnknownConversation, render_history
from latentmas.services.text_pipeline import DEFAULT_AGENTS, AdapterScope, Mode, PipelineKind, PipelineResult, Sampling
from latentmas.spec import GROUP, PLURAL, VERSION
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

log = logging.getLogger("latentmas.services.reasoning")
UI_DIR = Path(__file__).parent / "ui"
UI_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
EVOLVE_ANNOTATION = "latentmas.io/evolve"
DEFAULT_MAX_TOKENS = 128
RERANKER_ENV = "LATENTMAS_RERANKER"  # a local cross-encoder folder (the stack's pipeline.rag.reranker)
T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    """The expert a request goes to (None: the base model) and the router's confidence."""

    adapter: str | None
    confidence: float
    domain: str | None = None


@dataclass(frozen=True)
class ModelAccess:
    """Exclusive use of the served model, handed to pipeline code running in a worker thread."""

    model: Any
    tokenizer: Any
    adapter_scope: AdapterScope


class ReasoningBackend(Protocol):
    """What the reasoning layer needs from the serving engine."""

    def route(self, prompt: str, requested: str | None) -> Route:
        """Routes a prompt (an explicit adapter overrides the router)."""
        ...

    def active_versions(self) -> dict[str, int]:
        """Adapter name -> version this replica serves now."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def stream(self, prompt: str, *, adapter: str | None, max_tokens: int, temperature: float) -> AsyncIterator[str]:
        """Text deltas of a single-agent answer through the engine's batched decoder."""
        ...

    async def run_exclusive(self, fn: Callable[[ModelAccess], T], adapters: Sequence[str]) -> T:
        """Runs `fn` in a worker thread while no other forward pass touches the model; `adapters` are
        the experts `fn` will select through `ModelAccess.adapter_scope` (reserved before the model lock)."""
        ...

    async def run_program(self, build: Callable[[Any, Any], Program[T]], adapters: Sequence[str]) -> T:
        """Runs the program `build(model, tokenizer)` returns (`engine_work`): each forward pass with the
        model to itself and its item's adapter selected, other work interleaving between passes."""
        ...


EvolveTrigger = Callable[[], str]


def kube_evolve_trigger(namespace: str, stack: str, api_client: Any | None = None) -> EvolveTrigger:
    """Annotates the stack with a fresh nonce; the operator starts one cycle per nonce.
    Without `api_client`, the pod's in-cluster service account is used."""

    def trigger() -> str:
        from kubernetes import client, config

        api = api_client
        if api is None:
            config.load_incluster_config()
            api = client.ApiClient()
        nonce = str(time.time_ns())
        body = {"metadata": {"annotations": {EVOLVE_ANNOTATION: nonce}}}
        client.CustomObjectsApi(api).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, stack, body)
        return nonce

    return trigger


def in_cluster_evolve_trigger(namespace: str, stack: str) -> EvolveTrigger | None:
    """The trigger for this pod's own stack, when running in a cluster (else the endpoint answers 503)."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    return kube_evolve_trigger(namespace, stack)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    prompt: str = Field(min_length=1, max_length=32000)
    pipeline: PipelineKind | None = None
    conversation_id: str | None = Field(None, max_length=64)
    session_id: str | None = Field(None, max_length=128)
    lora_adapter: str | None = Field(None, max_length=128)
    rag_documents: list[Annotated[str, Field(max_length=32000)]] = Field(default_factory=list, max_length=64)
    no_default_data: bool = False
    max_tokens: Annotated[int, Field(ge=1, le=4096), BeforeValidator(integral)] | None = Field(
        None, description="Default: 128, or the server cap if lower."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    latent_steps: Annotated[int, Field(ge=0, le=512), BeforeValidator(integral)] | None = None
    agents_mode: Mode | None = None
    keep_cache: CacheKeep | None = None
    positions: Positions | None = None
    realign: bool | None = None
    realign_lambda: float | None = Field(None, gt=0.0, le=1e6)
    answer_format: AnswerFormat | None = Field(None, description="Default: the stack's prompts.answerFormat.")
    use_cache: bool = True


CACHE_IRRELEVANT: dict[str, str] = {
    "prompt": "the query the cache compares by embedding similarity",
    "conversation_id": "requests with history are never cached; a new conversation's id does not change the answer",
    "session_id": "groups conversations; does not reach the model",
    "rag_documents": "requests with inline documents are never cached",
    "use_cache": "the switch itself",
    "history_tokens": "requests with history are never cached",
    "max_prompt_chars": "a refusal bound, checked before any work",
    "max_batch": "batching gives every row its single-question result",
}
"""Request and settings fields that cannot change a cacheable answer, and why. Every other field is in
`Resolved` and so in the cache scope (tests/reasoning/test_semantic_cache_key.py enforces this)."""


@dataclass(frozen=True)
class Resolved:
    """What one request runs with, after the stack's defaults are applied; its JSON is the cache scope."""

    pipeline: PipelineKind
    adapter: str | None
    no_default_data: bool
    rag_k: int
    sampling: Sampling
    latent: LatentConfig
    answer: AnswerFormat
    prompts: PromptSet

    def scope(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class ReasoningSettings:
    """`latent`: the stack's `inference.agents` defaults (also the text pipeline's `mode`); `prompts` and
    `answer_format`: its `inference.agents.prompts`."""

    default_pipeline: PipelineKind = "single"
    latent: LatentConfig = field(default_factory=LatentConfig)
    prompts: PromptSet = DEFAULT_PROMPTS
    answer_format: AnswerFormat = "free"
    history_tokens: int = 512
    rag_k: int = 4
    max_tokens: int | None = None  # the serving cap (spec.inference.maxTokens); larger requests get 400
    max_prompt_chars: int | None = None  # the serving prompt bound; longer prompts get 400 before any work
    max_batch: int = 8  # concurrent latent requests run together, at most this many rows


def latent_config_from_spec(agents: Any) -> LatentConfig:
    """The stack's `inference.agents` section (`latentmas.spec.AgentsSpec`) as the pipelines' config."""
    return LatentConfig(
        latent_steps=agents.latent_steps,
        mode=agents.mode,
        keep=agents.keep_cache,
        realign=agents.realign,
        lam=agents.realign_lambda,
        positions=agents.positions,
    )


def reasoning_settings(inference: Any, chars_per_token: int) -> ReasoningSettings:
    """The stack's `inference` section (`latentmas.spec.InferenceSpec`) as the reasoning layer's settings."""
    agents = inference.agents
    return ReasoningSettings(
        default_pipeline=inference.agents_pipeline,
        latent=latent_config_from_spec(agents),
        prompts=prompts_from_spec(agents.prompts),
        answer_format=agents.prompts.answer_format,
        max_tokens=inference.max_tokens,
        max_batch=inference.max_batch_size,
        max_prompt_chars=inference.max_prompt_tokens * chars_per_token,
    )


class _TokenRelay:
    """Turns row 0's token ids from the worker thread into text deltas on the event loop's queue (whole
    characters only, through the service's one streaming detokeniser)."""

    def __init__(self, tokenizer: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
        self.loop, self.queue = loop, queue
        self.stream = StreamDetokenizer(tokenizer)

    def __call__(self, row: int, token: int) -> None:
        if row != 0:
            return
        delta = self.stream.push(token)
        if delta:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)


class ReasoningService:
    """One chat turn end to end; the router below only adapts it to HTTP."""

    def __init__(
        self,
        backend: ReasoningBackend,
        sessions: SessionStore,
        rag: RagContext | None = None,
        cache: SemanticCache | None = None,
        registry: Callable[[], Registry] | None = None,
        evolve: EvolveTrigger | None = None,
        settings: ReasoningSettings | None = None,
    ) -> None:
        self.backend, self.sessions, self.rag, self.cache = backend, sessions, rag, cache
        self.registry, self.evolve = registry, evolve
        self.settings = settings or ReasoningSettings()
        self.batcher = LatentBatcher(backend.run_program, self.settings.max_batch)

    def resolve(self, req: ChatRequest, adapter: str | None) -> Resolved:
        """The request's effective settings: its own fields over the stack's defaults."""
        base = self.settings.latent
        latent = LatentConfig(
            latent_steps=base.latent_steps if req.latent_steps is None else req.latent_steps,
            mode=req.agents_mode or base.mode,
            keep=req.keep_cache or base.keep,
            realign=base.realign if req.realign is None else req.realign,
            lam=req.realign_lambda or base.lam,
            positions=req.positions or base.positions,
        )
        return Resolved(
            pipeline=req.pipeline or self.settings.default_pipeline,
            adapter=adapter,
            no_default_data=req.no_default_data,
            rag_k=self.settings.rag_k,
            sampling=Sampling(req.max_tokens or DEFAULT_MAX_TOKENS, req.temperature, req.top_p),
            latent=latent,
            answer=req.answer_format or self.settings.answer_format,
            prompts=self.settings.prompts,
        )

    def versions(self) -> dict[str, Any]:
        return {"adapters": self.backend.active_versions(), "index": self.rag.index_version if self.rag else None}

    async def chat(self, req: ChatRequest) -> AsyncGenerator[dict[str, Any], None]:
        """Events: one `meta`, `token` deltas, one `done` with the full answer and its provenance."""
        started = time.perf_counter()
        cap = self.settings.max_tokens
        if req.max_tokens is None:
            req = req.model_copy(update={"max_tokens": min(DEFAULT_MAX_TOKENS, cap or DEFAULT_MAX_TOKENS)})
        elif cap is not None and req.max_tokens > cap:
            from latentmas.services.server import RequestError

            raise RequestError(f"max_tokens {req.max_tokens} exceeds the server cap {cap}", param="max_tokens")
        chars = self.settings.max_prompt_chars
        if chars is not None and len(req.prompt) > chars:
            from latentmas.services.server import RequestError

            raise RequestError(f"prompt: {len(req.prompt)} characters; the limit is {chars}", param="prompt")
        assert req.max_tokens is not None
        conversation = self.sessions.ensure_conversation(req.conversation_id, req.session_id, req.prompt)
        if req.rag_documents:
            self.sessions.add_documents(conversation, req.rag_documents)
        documents = self.sessions.documents(conversation)
        history = await asyncio.to_thread(
            self.sessions.history, conversation, self.settings.history_tokens, self.backend.count_tokens
        )
        route = await asyncio.to_thread(self.backend.route, req.prompt, req.lora_adapter)
        versions = self.versions()
        resolved = self.resolve(req, route.adapter)
        pipeline = resolved.pipeline
        scope = resolved.scope()
        cacheable = self.cache is not None and req.use_cache and not documents and not history and req.temperature == 0
        head = {
            "conversation_id": conversation,
            "pipeline": pipeline,
            "domain": route.domain or route.adapter or "base",
            "adapter": route.adapter,
            "domain_confidence": round(route.confidence, 4),
        }
        if cacheable and self.cache is not None:
            hit = await asyncio.to_thread(self.cache.lookup, req.prompt, scope, versions)
            if hit is not None:
                yield {"event": "meta", **head, "citations": hit.payload.get("citations", []), "cached": True}
                yield {"event": "token", "text": hit.payload["response"]}
                done = {**hit.payload, **head, "cached": True, "cache_similarity": round(hit.similarity, 4)}
                self._record(conversation, req.prompt, done)
                yield {"event": "done", **done, "seconds": round(time.perf_counter() - started, 4)}
                return
        citations: list[Citation] = []
        if self.rag is not None:
            citations = await asyncio.to_thread(
                self.rag.retrieve, req.prompt, conversation, documents, req.no_default_data, self.settings.rag_k
            )
        question = render_history(history) + augment(req.prompt, citations)
        cited = [c.as_dict() for c in citations]
        yield {"event": "meta", **head, "citations": cited, "cached": False}
        parts: list[str] = []
        summary: dict[str, Any]
        if pipeline == "single" and resolved.answer == "free":
            async for delta in self.backend.stream(
                question, adapter=route.adapter, max_tokens=req.max_tokens, temperature=req.temperature
            ):
                parts.append(delta)
                yield {"event": "token", "text": delta}
            answer = "".join(parts)
            summary = {
                "pipeline": "single",
                "agents": ["Assistant"],
                "latent_steps": 0,
                "cache_length": None,
                "prompt_tokens": await asyncio.to_thread(self.backend.count_tokens, question),
                "generated_tokens": await asyncio.to_thread(self.backend.count_tokens, answer) if answer else 0,
            }
        else:
            result: PipelineResult | None = None
            async for item in self._run_agents(question, resolved):
                if isinstance(item, str):
                    parts.append(item)
                    yield {"event": "token", "text": item}
                else:
                    result = item
            assert result is not None
            answer = result.texts[0]
            summary = result.summary()
            summary.pop("seconds", None)
        payload = {"response": answer, "citations": cited, **summary, "versions": versions}
        done = {**payload, **head, "cached": False}
        self._record(conversation, req.prompt, done)
        if cacheable and self.cache is not None and answer:
            await asyncio.to_thread(self.cache.store, req.prompt, scope, versions, payload)
        yield {"event": "done", **done, "seconds": round(time.perf_counter() - started, 4)}

    async def _run_agents(self, question: str, resolved: Resolved) -> AsyncIterator[str | PipelineResult]:
        """Runs a pipeline on the engine's model, relaying the final agent's tokens: latent requests go
        through the batcher (batched with concurrent equal-settings ones), the others run alone."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        relay: _TokenRelay | None = None

        def relay_for(tokenizer: Any) -> _TokenRelay:
            nonlocal relay
            if relay is None:
                relay = _TokenRelay(tokenizer, loop, queue)
            return relay

        task: asyncio.Future[PipelineResult]
        if resolved.pipeline == "latent":
            agents = tuple(with_adapter(DEFAULT_AGENTS, resolved.adapter))
            key = BatchKey(resolved.sampling, resolved.latent, agents, resolved.answer, resolved.prompts)
            task = asyncio.ensure_future(
                self.batcher.submit(key, question, lambda tokenizer, token: relay_for(tokenizer)(0, token))
            )
        else:

            def work(access: ModelAccess) -> PipelineResult:
                return run_pipeline(
                    resolved.pipeline,
                    access.model,
                    access.tokenizer,
                    [question],
                    resolved.sampling,
                    latent=resolved.latent,
                    adapter=resolved.adapter,
                    adapter_scope=access.adapter_scope,
                    on_token=relay_for(access.tokenizer),
                    answer=resolved.answer,
                    prompts=resolved.prompts,
                )

            adapters = [resolved.adapter] if resolved.adapter else []
            task = asyncio.ensure_future(self.backend.run_exclusive(work, adapters))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        while (delta := await queue.get()) is not None:
            yield delta
        yield await task

    def _record(self, conversation: str, prompt: str, done: dict[str, Any]) -> None:
        self.sessions.add_message(conversation, "user", prompt)
        meta = {k: done.get(k) for k in ("pipeline", "domain", "domain_confidence", "citations", "cached")}
        self.sessions.add_message(conversation, "assistant", done["response"], meta)

    def experts(self) -> dict[str, Any]:
        if self.rag is not None and self.rag.index is not None:
            self.rag.index.refresh()
        active = self.backend.active_versions()
        registry = self.registry() if self.registry is not None else None
        targets = {name: entry.current for name, entry in registry.experts.items()} if registry else {}
        names = sorted(set(active) | set(targets))
        return {
            "experts": [{"name": n, "active": active.get(n), "target": targets.get(n)} for n in names],
            "index": {
                "active": self.rag.index_version if self.rag else None,
                "target": registry.index.current if registry else None,
            },
        }


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"


def create_reasoning_router(service: ReasoningService | None = None) -> APIRouter:
    """Routes: `/` (UI), `/ui/*`, and `/reasoning/*` (chat, chat/stream, conversations, experts, evolve).

    With a `service`, every route uses it. Without one (the serving app's default `router` below), the
    service is `app.state.reasoning`, built on first use around the app's InferenceServer."""
    router = APIRouter()

    async def current(request: Request) -> ReasoningService:
        return service if service is not None else await service_for_app(request.app)

    Service = Annotated[ReasoningService, Depends(current)]

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((UI_DIR / "index.html").read_text())

    @router.get("/ui/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in UI_FILES:
            raise HTTPException(404, f"no UI asset {name!r}")
        return FileResponse(UI_DIR / name, media_type=UI_FILES[name])

    chat_errors = responses(400, 404, 429, 500, 503)
    sse = {"text/event-stream": {"schema": {"type": "object", "description": "meta, token, then done or error"}}}

    @router.post("/reasoning/chat", responses=chat_errors)
    async def chat(req: ChatRequest, service: Service) -> dict[str, Any]:
        final: dict[str, Any] = {}
        async for event in service.chat(req):
            if event["event"] == "done":
                final = {k: v for k, v in event.items() if k != "event"}
        return final

    @router.post(
        "/reasoning/chat/stream",
        response_class=StreamingResponse,
        responses={**chat_errors, 200: {"description": "Server-sent events", "content": sse}},
    )
    async def chat_stream(req: ChatRequest, service: Service) -> StreamingResponse:
        turn = service.chat(req)
        first = await turn.__anext__()  # refusals (unknown adapter, caps) are HTTP errors, not stream events

        async def events() -> AsyncIterator[str]:
            try:
                yield _sse(first)
                async for event in turn:
                    yield _sse(event)
            except Exception as err:  # the stream has started: report the failure in-band
                log.exception("chat stream failed")
                message = str(err) or type(err).__name__
                status = getattr(err, "status", None) or getattr(err, "status_code", None) or 500
                yield _sse({"event": "error", "message": message, **error_body(int(status), message)})
            finally:
                await turn.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.get("/reasoning/conversations")
    def list_conversations(service: Service, session_id: str | None = None, limit: int = 50) -> dict[str, Any]:
        convs = service.sessions.list_conversations(session_id, max(1, min(limit, 500)))
        return {"conversations": [c.as_dict() for c in convs]}

    @router.get("/reasoning/conversations/{conversation_id}", responses=responses(404))
    def conversation(conversation_id: str, service: Service) -> dict[str, Any]:
        try:
            messages = service.sessions.messages(conversation_id)
        except UnknownConversation as err:
            raise HTTPException(404, f"conversation {conversation_id!r} not found") from err
        return {
            "conversation_id": conversation_id,
            "messages": [{"role": m.role, "content": m.content, "created": m.created, **m.meta} for m in messages],
        }

    @router.get("/reasoning/experts")
    async def experts(service: Service) -> dict[str, Any]:
        return await asyncio.to_thread(service.experts)

    @router.post("/reasoning/evolve", responses=responses(502, 503))
    async def evolve(service: Service) -> dict[str, Any]:
        if service.evolve is None:
            raise HTTPException(503, "evolution trigger unavailable: the server is not running in a Kubernetes cluster")
        try:
            nonce = await asyncio.to_thread(service.evolve)
        except Exception as err:
            raise HTTPException(502, f"could not annotate the stack: {err}") from err
        return {"annotation": EVOLVE_ANNOTATION, "nonce": nonce}

    return router


class ServerBackend:
    """`ReasoningBackend` over the serving app's InferenceServer (`app.state.engine`): its router, its
    batched decoder for single answers, and its model under the engine's step lock, with adapters
    selected through the multi-LoRA routing context for the pipelines' own forward passes."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def route(self, prompt: str, requested: str | None) -> Route:
        from latentmas.services.server import AUTO, GenerationRequest

        request = GenerationRequest(prompt=prompt, adapter=requested or AUTO)
        decision = self.server.route(request)
        if not decision.experts:
            return Route(None, float(decision.confidence), None)
        name = max(decision.experts, key=lambda expert: expert[1])[0]
        return Route(str(name), float(decision.confidence), str(name))

    def active_versions(self) -> dict[str, int]:
        cache = self.server.cache
        return {str(k): int(v) for k, v in cache.active.items()} if cache is not None else {}

    def count_tokens(self, text: str) -> int:
        return len(self.server.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def stream(
        self, prompt: str, *, adapter: str | None, max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        from latentmas.services.sampling import SamplingParams
        from latentmas.services.server import GenerationRequest

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        async for event in self.server.stream(
            GenerationRequest(prompt=prompt, adapter=adapter or "base", params=params)
        ):
            if event.kind == "text":
                yield event.text

    async def run_exclusive(self, fn: Callable[[ModelAccess], T], adapters: Sequence[str]) -> T:
        async with self._leased(adapters) as (engine, access):
            result: T = await asyncio.to_thread(engine.run_exclusive, lambda: fn(access))
            return result

    async def run_program(self, build: Callable[[Any, Any], Program[T]], adapters: Sequence[str]) -> T:
        async with self._leased(adapters) as (engine, access):
            program = build(access.model, access.tokenizer)
            result: T = await asyncio.to_thread(drive, program, access.adapter_scope, engine.run_exclusive)
            return result

    @asynccontextmanager
    async def _leased(self, adapters: Sequence[str]) -> AsyncIterator[tuple[Any, ModelAccess]]:
        """The engine and model access with `adapters` reserved in its LoRA slots until the block ends."""
        from latentmas.services.routing import RouteDecision
        from latentmas.services.server import NotReady

        engine = self.server.engine
        if engine is None:
            raise NotReady(self.server.startup_error or "base model not loaded yet")
        leases = {}
        try:
            for name in dict.fromkeys(adapters):
                leases[name] = await asyncio.to_thread(self.server.lease, RouteDecision([(name, 1.0)], 1.0, "explicit"))
            yield engine, ModelAccess(engine.model, self.server.tokenizer, self._scope(engine, leases))
        finally:
            for lease in leases.values():
                self.server.release(lease)

    @staticmethod
    def _scope(engine: Any, leases: dict[str, Any]) -> AdapterScope:
        @contextmanager
        def scope(name: str | None, batch: int) -> Iterator[None]:
            if name is None:
                yield
                return
            if name not in leases:
                raise HTTPException(400, f"adapter {name!r} was not reserved for this request")
            mix = leases[name].mix
            context = engine.lora.context
            context.indices = torch.tensor([[slot for slot, _ in mix]] * batch, device=engine.device)
            context.weights = torch.tensor([[weight for _, weight in mix]] * batch, device=engine.device)
            try:
                yield
            finally:
                context.indices, context.weights = None, None

        return scope


_BUILD_LOCK = threading.Lock()


async def service_for_app(app: FastAPI) -> ReasoningService:
    """The app's ReasoningService, built once around its InferenceServer: sessions under the serving
    cache folder, the stack's promoted index (reloaded on every applied registry revision), the semantic
    cache, and the in-cluster evolution trigger."""
    existing: ReasoningService | None = getattr(app.state, "reasoning", None)
    if existing is not None:
        return existing

    def build_once() -> ReasoningService:
        with _BUILD_LOCK:
            built: ReasoningService | None = getattr(app.state, "reasoning", None)
            if built is None:
                built = _build_service(app.state.engine)
                app.state.reasoning = built
            return built

    return await asyncio.to_thread(build_once)


def _build_service(server: Any) -> ReasoningService:
    from latentmas.jobs.embedding import load_embedder
    from latentmas.jobs.retrieval import cross_encoder_reranker
    from latentmas.services.server import CHARS_PER_TOKEN

    settings = server.settings
    root = Path(settings.cache_dir) / "reasoning"
    embedder = load_embedder()
    reranker_path = os.environ.get(RERANKER_ENV)
    index = StackIndex(
        server.store,
        settings.storage.artifacts_bucket,
        settings.namespace,
        settings.stack,
        root / "index",
        poll_seconds=settings.inference.reload_poll_seconds,
        reranker=cross_encoder_reranker(reranker_path) if reranker_path else None,
    )
    server.on_registry_change(lambda _registry: index.refresh(force=True))
    evolve = (
        kube_evolve_trigger(settings.namespace, settings.stack) if os.environ.get("KUBERNETES_SERVICE_HOST") else None
    )
    return ReasoningService(
        ServerBackend(server),
        SessionStore(root / "sessions.sqlite"),
        rag=RagContext(embedder, index),
        cache=SemanticCache(embedder, registry=server.metrics.registry),
        registry=lambda: server.reloader.registry or server.source.registry(),
        evolve=evolve,
        settings=reasoning_settings(settings.inference, CHARS_PER_TOKEN),
    )


router = create_reasoning_router()
"""What the serving app mounts by default (`ServeSettings.routers`)."""
