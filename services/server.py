"""The inference server object behind the HTTP API (`app.state.engine`): it loads the base once, keeps
adapters and the router in step with the registry, and turns requests into engine sequences.

Other routers (the reasoning API) use `generate`/`stream`, `versions()`, `model`/`tokenizer` with
`run_exclusive`, and `on_registry_change` — documented in docs/serving.md."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from latentmas.registry import ArtifactVersion, Registry
from latentmas.services.adapter_cache import AdapterCache, Lease, NoFreeSlot, UnknownAdapter, device_pinnable
from latentmas.services.engine import Engine, Sequence
from latentmas.services.hotreload import RegistrySource, Reloader, Watcher
from latentmas.services.lora import install_multi_lora
from latentmas.services.metrics import ServingMetrics
from latentmas.services.podstatus import publisher_from_env
from latentmas.services.routing import RouteDecision, RouterRuntime, decide
from latentmas.services.sampling import SamplingParams
from latentmas.services.settings import ServeSettings
from latentmas.store import ObjectStore, open_store
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger("latentmas.services.server")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_NAMES = ("base", "")
AUTO = "auto"
SLOT_WAIT_SECONDS = 30.0


class RequestError(ValueError):
    """A request the server refuses (HTTP 400/404); `status` says which."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Overloaded(RuntimeError):
    """Concurrency limit reached (HTTP 429)."""


class NotReady(RuntimeError):
    """Base model or registry not loaded yet (HTTP 503)."""


@dataclass
class GenerationRequest:
    """One generation. `adapter`: an expert name, 'auto' (router), or 'base'/None-with-no-router."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    system_prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = AUTO
    router_temperature: float | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    route: RouteDecision
    experts: list[tuple[str, int, float]]
    request_id: str

    def routing_info(self) -> dict[str, Any]:
        return routing_info(self.route, self.experts)


def routing_info(route: RouteDecision, experts: list[tuple[str, int, float]]) -> dict[str, Any]:
    """What every response says about who answered."""
    return {
        "experts": [{"name": n, "version": v, "weight": round(w, 6)} for n, v, w in experts],
        "confidence": round(route.confidence, 6),
        "reason": route.reason,
    }


@dataclass
class StreamEvent:
    kind: str  # "start" | "text" | "done"
    text: str = ""
    result: GenerationResult | None = None


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[str, str]], item: tuple[str, str]) -> None:
    """Hands an engine-thread event to the request's coroutine."""
    loop.call_soon_threadsafe(queue.put_nowait, item)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class InferenceServer:
    def __init__(self, settings: ServeSettings, store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.spec = settings.inference
        self.metrics = ServingMetrics()
        self.store = store or open_store(settings.storage)
        self.device = pick_device(settings.device)
        self.source = RegistrySource(
            self.store, settings.storage.artifacts_bucket, settings.namespace, settings.stack, settings.cache_dir
        )
        self.engine: Engine | None = None
        self.cache: AdapterCache | None = None
        self.router: RouterRuntime | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.base_version: int | None = None
        self.reloader = Reloader(
            self.source,
            apply_expert=self._apply_expert,
            remove_expert=self._remove_expert,
            apply_router=self._apply_router,
            active=self._active,
        )
        self.reloader.on_change.append(self._publish_versions)
        self.watcher: Watcher | None = None
        self.publisher = publisher_from_env()
        self.startup_error: str | None = None
        self.in_flight = 0
        self._known: dict[tuple[str, int], ArtifactVersion] = {}
        self._stopped = threading.Event()
        self._starter = threading.Thread(target=self._start_loop, name="latentmas-startup", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None and self.reloader.registry is not None

    @property
    def model(self) -> torch.nn.Module:
        if self.engine is None:
            raise NotReady("base model not loaded yet")
        return self.engine.model

    def start(self) -> InferenceServer:
        self._starter.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline and not self._stopped.is_set():
            time.sleep(0.05)
        return self.ready

    def stop(self) -> None:
        self._stopped.set()
        if self.watcher:
            self.watcher.stop()
        if self.engine:
            self.engine.stop()

    def _start_loop(self) -> None:
        """Waits for a base model in the registry (a fresh stack has none until its first cycle)."""
        while not self._stopped.is_set():
            try:
                if self.engine is None:
                    self._load_base()
                self.reloader.check(force=True)
                self.startup_error = None
                self.watcher = Watcher(
                    self.reloader, self.spec.reload_poll_seconds, self._watch_error, self.settings.notifications
                ).start()
                return
            except Exception as err:
                self.startup_error = str(err)
                log.warning("not ready yet: %s", err)
                self._stopped.wait(self.spec.reload_poll_seconds)

    def _watch_error(self, message: str) -> None:
        log.warning("registry watch: %s", message)

    def _base_folder(self) -> Path:
        registry = self.source.registry()
        active = registry.base.active()
        if active is not None:
            self.base_version = active.version
            return self.source.download("base", "base", active)
        uri = self.settings.base_model.uri
        if uri.startswith("pvc:") or uri.startswith("/"):
            return Path(uri.removeprefix("pvc:"))
        raise NotReady(f"no base model in registry {self.source.key} yet (baseModel.uri={uri})")

    def _load_base(self) -> None:
        folder = self._base_folder()
        dtype = getattr(torch, self.settings.base_model.dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        cast(torch.nn.Module, model).to(device=self.device)
        model.eval()
        lora = install_multi_lora(model, LORA_TARGETS, self.spec.adapter_slots, self.spec.max_lora_rank)
        engine = Engine(lora, tokenizer, self.spec.max_batch_size, observer=self.metrics, seed=self.settings.seed)
        self.cache = AdapterCache(
            lora,
            engine.step_lock,
            fetch=self._fetch_expert,
            cpu_capacity=self.spec.cpu_cache_adapters,
            pin_memory=device_pinnable(self.device),
            observer=self.metrics,
        )
        self.tokenizer = tokenizer
        self.engine = engine.start()
        log.info("base model loaded from %s on %s", folder, self.device)

    # ---- registry hooks --------------------------------------------------------------------------
    def _fetch_expert(self, name: str, version: int) -> Path:
        return self.source.download("experts", name, self._known[(name, version)])

    def _apply_expert(self, name: str, version: ArtifactVersion) -> None:
        assert self.cache is not None
        started = time.monotonic()
        self._known[(name, version.version)] = version
        try:
            self.cache.activate(name, version.version)
        except Exception:
            self.metrics.reload_failures.inc()
            raise
        self.metrics.reload_latency.observe(time.monotonic() - started)
        self.metrics.slots_used.set(self.cache.stats()["slots"]["used"])

    def _remove_expert(self, name: str) -> None:
        if self.cache is not None:
            self.cache.deactivate(name)

    def _apply_router(self, folder: Path, version: int) -> None:
        self.router = RouterRuntime(folder, version, self.device)

    def _active(self) -> dict[str, int]:
        return dict(self.cache.active) if self.cache else {}

    def versions(self) -> dict[str, int | None]:
        """Active versions: each expert, plus 'router', 'index' (registry's) and 'base'."""
        registry = self.reloader.registry
        return {
            **self._active(),
            "router": self.router.version if self.router else None,
            "index": registry.index.current if registry else None,
            "base": self.base_version,
        }

    def on_registry_change(self, callback: Callable[[Registry], None]) -> None:
        """Called (from the watcher thread) after each applied registry revision, e.g. to reload RAG."""
        self.reloader.on_change.append(callback)

    def _publish_versions(self, _registry: Registry) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish(self.versions(), {k: str(v["error"]) for k, v in self.reloader.errors.items()})
        except Exception as err:  # the pod annotation is a report; serving must go on without it
            log.warning("publishing active versions failed: %s", err)

    def reload(self) -> dict[str, Any]:
        report = self.reloader.check(force=True)
        return {"revision": report.revision, "changed": report.changed, "errors": report.errors}

    def pin(self, name: str, version: int) -> None:
        """Activates a specific registry version of an expert (manual load or rollback)."""
        registry = self.reloader.registry or self.source.registry()
        entry = registry.experts.get(name)
        found = next((v for v in entry.history if v.version == version), None) if entry else None
        if found is None:
            raise RequestError(f"adapter {name!r} has no version {version} in the registry", 404)
        self._apply_expert(name, found)

    def unload(self, name: str) -> None:
        try:
            self._remove_expert(name)
        except UnknownAdapter as err:
            raise RequestError(f"adapter {name!r} is not loaded", 404) from err

    def adapters(self) -> dict[str, Any]:
        registry = self.reloader.registry
        return {
            "active": self._active(),
            "versions": self.versions(),
            "registry_revision": registry.revision if registry else None,
            "errors": self.reloader.errors,
            "notifications": bool(self.watcher and self.watcher.notifications),
            "cache": self.cache.stats() if self.cache else None,
        }

    # ---- requests --------------------------------------------------------------------------------
    def prompt_text(self, request: GenerationRequest) -> str:
        assert self.tokenizer is not None
        messages = list(request.messages or [])
        if request.prompt is not None:
            messages.append({"role": "user", "content": request.prompt})
        if request.system_prompt:
            messages.insert(0, {"role": "system", "content": request.system_prompt})
        if not messages:
            raise RequestError("a prompt or at least one message is required")
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return str(text)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        spec = self.spec
        if len(ids) > spec.max_prompt_tokens:
            raise RequestError(f"prompt has {len(ids)} tokens; the limit is {spec.max_prompt_tokens}")
        if params.max_tokens > spec.max_tokens:
            raise RequestError(f"max_tokens {params.max_tokens} exceeds the server cap {spec.max_tokens}")
        window = getattr(self.model.config, "max_position_embeddings", None)
        if window and len(ids) + params.max_tokens > window:
            raise RequestError(f"prompt + max_tokens = {len(ids) + params.max_tokens} exceeds the context {window}")

    def route(self, request: GenerationRequest, text: str) -> RouteDecision:
        """Which experts answer `request` (explicit adapter, router, or base); `text` is the rendered prompt."""
        assert self.cache is not None and self.engine is not None and self.tokenizer is not None
        adapter = request.adapter
        if adapter is not None and adapter != AUTO:
            if adapter in BASE_NAMES:
                return RouteDecision([], 1.0, "base")
            if adapter not in self.cache.active:
                raise RequestError(f"unknown model/adapter {adapter!r}; see GET /v1/models", 404)
            return RouteDecision([(adapter, 1.0)], 1.0, "explicit")
        router = self.router
        if router is None:
            return RouteDecision([], 0.0, "no_router")
        temperature = request.router_temperature or self.spec.router_temperature
        tokenizer = self.tokenizer
        gates = self.engine.run_exclusive(lambda: router.gates(self.model, tokenizer, text, temperature))
        return decide(gates, self.spec.routing_mode, self.spec.confidence_threshold, set(self.cache.active))

    def lease(self, route: RouteDecision) -> Lease:
        """Pins the route's adapters in device slots (waits while all slots are busy); pair with release()."""
        assert self.cache is not None
        deadline = time.monotonic() + SLOT_WAIT_SECONDS
        while True:
            try:
                return self.cache.acquire(route.experts)
            except UnknownAdapter as err:
                raise RequestError(f"adapter {err.args[0]!r} was unloaded", 404) from err
            except NoFreeSlot:
                if time.monotonic() > deadline:
                    raise Overloaded("all adapter slots stayed busy") from None
                time.sleep(0.02)

    def release(self, lease: Lease) -> None:
        assert self.cache is not None
        self.cache.release(lease)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yields 'start' (after routing), 'text' deltas, then one 'done' with the full result."""
        if not self.ready or self.engine is None or self.tokenizer is None or self.cache is None:
            raise NotReady(self.startup_error or "base model or registry not loaded yet")
        if self.in_flight >= self.spec.max_concurrent_requests:
            raise Overloaded(f"{self.in_flight} requests in flight; the limit is {self.spec.max_concurrent_requests}")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        lease: Lease | None = None
        seq: Sequence | None = None
        try:
            text = self.prompt_text(request)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise RequestError("the prompt is empty after tokenization")
            self._validate(ids, request.params)
            route = await asyncio.to_thread(self.route, request, text)
            lease = await asyncio.to_thread(self.lease, route)
            request_id = uuid.uuid4().hex
            yield StreamEvent("start", result=self._result(request_id, "", "", len(ids), 0, route, lease))
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
            seq = Sequence(
                ids,
                request.params,
                lease.mix,
                on_text=lambda delta: _post(loop, queue, ("text", delta)),
                on_done=lambda reason: _post(loop, queue, ("done", reason)),
            )
            self.engine.submit(seq)
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield StreamEvent("text", text=value)
                    continue
                if value.startswith("error"):
                    raise RuntimeError(value)
                result = self._result(request_id, seq.text, value, len(ids), len(seq.output_ids), route, lease)
                yield StreamEvent("done", result=result)
                return
        finally:
            if seq is not None and seq.finish_reason is None:
                seq.cancelled = True
            if lease is not None:
                self.cache.release(lease)
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    def _result(
        self, request_id: str, text: str, reason: str, prompt: int, completion: int, route: RouteDecision, lease: Lease
    ) -> GenerationResult:
        return GenerationResult(text, reason, prompt, completion, route, lease.experts, request_id)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole completion at once."""
        async for event in self.stream(request):
            if event.kind == "done" and event.result is not None:
                return event.result
        raise RuntimeError("generation ended without a result")
