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
from latentmas.basesource import parse_base_uri
from latentmas.chat import render
from latentmas.prompts import request_messages, routing_text
from latentmas.registry import ArtifactVersion, Registry
from latentmas.services.adapter_cache import AdapterCache, Lease, NoFreeSlot, UnknownAdapter, device_pinnable
from latentmas.services.admission import auto_budget, free_memory, kv_bytes_per_token
from latentmas.services.coalesce import Coalescer
from latentmas.services.engine import Engine, Sequence, decode_compiler
from latentmas.services.hotreload import RegistrySource, RegistryUnavailable, Reloader, Watcher
from latentmas.services.lora import install_multi_lora
from latentmas.services.metrics import ServingMetrics
from latentmas.services.podstatus import publisher_from_env
from latentmas.services.routing import RouteDecision, RouterRuntime, decide
from latentmas.services.sampling import SamplingParams
from latentmas.services.settings import ServeSettings
from latentmas.store import ObjectStore, open_store
from latentmas.training.architectures import discover_target_modules
from latentmas.training.baseimport import base_identity, same_base
from latentmas.training.gate import base_mismatch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger("latentmas.services.server")
BASE_NAMES = ("base", "")
AUTO = "auto"
SLOT_WAIT_SECONDS = 30.0
CHARS_PER_TOKEN = 32  # prompts above maxPromptTokens x this many characters are refused before tokenising
GateAsk = tuple[RouterRuntime, str, float]
"""One `auto` request's routing question: the router version it read, the question, the router temperature."""


class RequestError(ValueError):
    """A request the server refuses (HTTP 400/404/409/413); `status` says which, `param` the field, if one."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


class GenerationFailed(RuntimeError):
    """This request's generation failed in the engine (HTTP 500); other requests are unaffected."""


class StorageUnavailable(RuntimeError):
    """The object store could not be reached for this operation (HTTP 503)."""


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


def batched_gates(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> Callable[[list[GateAsk]], list[dict[str, float]]]:
    """The router-feature work of one base: every waiting question of a router version in one truncated
    forward (`RouterRuntime.gates_many`), run by the runtime's `Coalescer` under the model lock."""

    def process(asks: list[GateAsk]) -> list[dict[str, float]]:
        groups: dict[int, tuple[RouterRuntime, list[int]]] = {}
        for index, (router, _, _) in enumerate(asks):
            groups.setdefault(id(router), (router, []))[1].append(index)
        out: list[dict[str, float]] = [{} for _ in asks]
        for router, indices in groups.values():
            gates = router.gates_many(model, tokenizer, [(asks[i][1], asks[i][2]) for i in indices])
            for index, weights in zip(indices, gates, strict=True):
                out[index] = weights
        return out

    return process


@dataclass
class Runtime:
    """Everything tied to one loaded base. A base switch replaces the whole runtime at once. `gates` batches
    the router features of concurrent `auto` requests into one forward between decode steps."""

    engine: Engine
    cache: AdapterCache
    tokenizer: PreTrainedTokenizerBase
    base_version: int | None
    base_files: dict[str, str] | None
    base: dict[str, Any]
    gates: Coalescer[GateAsk, dict[str, float]]
    router: RouterRuntime | None = None
    users: int = 0  # requests that took this runtime and may still submit to its engine


@dataclass
class StreamEvent:
    kind: str  # "start" | "text" | "done"
    text: str = ""
    result: GenerationResult | None = None


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[str, str]], item: tuple[str, str]) -> None:
    """Hands an engine-thread event to the request's coroutine."""
    loop.call_soon_threadsafe(queue.put_nowait, item)


def _not_ready() -> Runtime:
    raise NotReady("base model not loaded yet")


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
        self.runtime: Runtime | None = None
        self._lease_caches: dict[int, AdapterCache] = {}
        self.reloader = Reloader(
            self.source,
            apply_expert=self._apply_expert,
            remove_expert=self._remove_expert,
            apply_router=self._apply_router,
            active=self._active,
            apply_base=self._apply_base,
            on_refused=lambda reason: self.metrics.registry_refused.labels(reason).inc(),
        )
        self.reloader.on_change.append(self._publish_versions)
        self.reloader.on_change.append(lambda registry: self.metrics.registry_revision.set(registry.revision))
        self.watcher: Watcher | None = None
        self.publisher = publisher_from_env()
        self.startup_error: str | None = None
        self.in_flight = 0
        self._known: dict[tuple[str, int], ArtifactVersion] = {}
        self._stopped = threading.Event()
        self._starter = threading.Thread(target=self._start_loop, name="latentmas-startup", daemon=True)

    # ---- the loaded base (one Runtime; a base switch replaces it whole) ------------------------------
    @property
    def engine(self) -> Engine | None:
        return self.runtime.engine if self.runtime else None

    @property
    def cache(self) -> AdapterCache | None:
        return self.runtime.cache if self.runtime else None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.runtime.tokenizer if self.runtime else None

    @property
    def router(self) -> RouterRuntime | None:
        return self.runtime.router if self.runtime else None

    @property
    def base_version(self) -> int | None:
        return self.runtime.base_version if self.runtime else None

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
        log.debug("registry watch: %s", message)  # the Watcher logs outages with backoff; /adapters shows them

    def _base_folder(self) -> tuple[Path, ArtifactVersion | None]:
        registry = self.source.registry()
        active = registry.base.active()
        if active is not None:
            return self.source.download("base", "base", active), active
        source = parse_base_uri(self.settings.base_model.uri)
        if source.kind in ("mounted", "pvc") and not source.gguf:
            return source.local_path(), None
        raise NotReady(f"no base model in registry {self.source.key} yet (baseModel.uri={source.uri})")

    def _load_base(self) -> None:
        folder, version = self._base_folder()
        self.runtime = self._build_runtime(folder, version)
        log.info("base model loaded from %s on %s", folder, self.device)

    def _build_runtime(self, folder: Path, version: ArtifactVersion | None) -> Runtime:
        """Loads a base and starts an engine over it; nothing is shared with the runtime it may replace."""
        dtype = getattr(torch, self.settings.base_model.dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        cast(torch.nn.Module, model).to(device=self.device)
        model.eval()
        lora = install_multi_lora(
            model, discover_target_modules(model), self.spec.adapter_slots, self.spec.max_lora_rank
        )
        engine = Engine(
            lora,
            tokenizer,
            self.spec.max_batch_size,
            observer=self.metrics,
            seed=self.settings.seed,
            kv_budget_tokens=self._kv_budget(model.config, dtype),
            prefill_chunk=self.settings.prefill_chunk_tokens,
            compile_decode=decode_compiler(self.settings.compile_decode, self.device),
        )
        cache = AdapterCache(
            lora,
            engine.step_lock,
            fetch=self._fetch_expert,
            cpu_capacity=self.spec.cpu_cache_adapters,
            pin_memory=device_pinnable(self.device),
            observer=self.metrics,
        )
        base = {
            "identity": base_identity(version.files) if version else None,
            "model_type": model.config.model_type,
            "hidden_size": model.config.hidden_size,
        }
        files = version.files if version else None
        return Runtime(
            engine=engine.start(),
            cache=cache,
            tokenizer=tokenizer,
            base_version=version.version if version else None,
            base_files=files,
            base=base,
            gates=Coalescer(batched_gates(model, tokenizer), engine.run_exclusive),
        )

    def _kv_budget(self, config: Any, dtype: torch.dtype) -> int:
        """`inference.kvBudgetTokens`, or sized from the memory free after loading (see services/admission)."""
        if self.spec.kv_budget_tokens is not None:
            return self.spec.kv_budget_tokens
        budget = auto_budget(
            kv_bytes_per_token(config, torch.tensor([], dtype=dtype).element_size()),
            free_memory(self.device),
            self.spec.max_batch_size,
            self.spec.max_prompt_tokens + self.spec.max_tokens,
        )
        log.info("KV budget: %d tokens (inference.kvBudgetTokens unset)", budget)
        return budget

    def _apply_base(self, registry: Registry) -> bool:
        """Switches to the registry's base when it changed: the new base is loaded beside the old one with every
        compatible expert and the router, then new requests go to it while in-flight ones finish on the old one,
        which is stopped once idle. Returns whether it switched."""
        target = registry.base.active()
        current = self.runtime
        if target is None or current is None or target.version == current.base_version:
            return False
        if current.base_files == target.files:
            current.base_version = target.version
            return False
        log.info("switching base to v%d", target.version)
        new = self._build_runtime(self.source.download("base", "base", target), target)
        for name, entry in registry.experts.items():
            version = entry.active()
            if version is None or self._base_problem(version, new):
                continue
            self._known[(name, version.version)] = version
            new.cache.activate(name, version.version)
        router = registry.router.active()
        if router is not None:
            new.router = RouterRuntime(self.source.download("router", "router", router), router.version, self.device)
        self.runtime = new
        threading.Thread(target=self._retire, args=(current,), name="latentmas-retire", daemon=True).start()
        self.metrics.slots_used.set(new.cache.stats()["slots"]["used"])
        return True

    def _retire(self, old: Runtime) -> None:
        """Stops a replaced engine once the requests it still serves have finished."""
        while (old.users or old.engine.active or old.engine.queued) and not self._stopped.is_set():
            self._stopped.wait(0.05)
        old.engine.stop()
        log.info("base v%s retired", old.base_version)

    @staticmethod
    def _base_problem(version: ArtifactVersion, runtime: Runtime) -> str | None:
        """Why an adapter version may not run on the runtime's base (None when it may, or when either side
        predates base identities)."""
        recorded = version.metrics.get("base") or {"identity": version.metrics.get("base_sha256")}
        if runtime.base_files is None or recorded.get("identity") is None:
            return None
        if same_base(recorded["identity"], runtime.base_files):
            return None
        return base_mismatch(recorded, runtime.base)

    # ---- registry hooks --------------------------------------------------------------------------
    def _fetch_expert(self, name: str, version: int) -> Path:
        return self.source.download("experts", name, self._known[(name, version)])

    def _apply_expert(self, name: str, version: ArtifactVersion) -> None:
        assert self.cache is not None and self.runtime is not None
        problem = self._base_problem(version, self.runtime)
        if problem:
            raise ValueError(f"expert {name} v{version.version} refused: {problem}")
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
        assert self.runtime is not None
        self.runtime.router = RouterRuntime(folder, version, self.device)

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
        """A forced registry check; a refused read is a 409 and a storage outage a 503, nothing changes."""
        try:
            report = self.reloader.check(force=True)
        except RegistryUnavailable as err:
            raise StorageUnavailable(f"registry unreadable, still serving the last good revision: {err}") from err
        if report.refused is not None:
            raise RequestError(report.refused.message, 409)
        return {"revision": report.revision, "changed": report.changed, "errors": report.errors}

    def pin(self, name: str, version: int) -> None:
        """Activates a specific registry version of an expert (manual load or rollback)."""
        registry = self.reloader.registry or self.source.registry()
        entry = registry.experts.get(name)
        found = next((v for v in entry.history if v.version == version), None) if entry else None
        if found is None:
            raise RequestError(f"adapter {name!r} has no version {version} in the registry", 404)
        self.reloader.pin(name, found)

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
            "registry_error": self.reloader.registry_error,
            "notifications": bool(self.watcher and self.watcher.notifications),
            "cache": self.cache.stats() if self.cache else None,
        }

    # ---- requests --------------------------------------------------------------------------------
    def prompt_text(self, request: GenerationRequest, rt: Runtime | None = None) -> str:
        """The request as the experts were trained on it: the shared prompt builder's messages (SFT's system
        prompt unless the request sets one) in the base's chat template, ready for the answer."""
        tokenizer = (rt or self.runtime or _not_ready()).tokenizer
        try:
            messages = request_messages(request.messages or [], request.prompt, request.system_prompt)
        except ValueError as err:
            raise RequestError(str(err)) from err
        return render(tokenizer, messages, add_generation_prompt=True)

    def _check_length(self, request: GenerationRequest) -> None:
        """Refuses a prompt text too long to possibly fit before spending any CPU on rendering or tokenising
        it (each field on its own: the request body limit bounds their sum)."""
        limit = self.spec.max_prompt_tokens * CHARS_PER_TOKEN
        fields = [("prompt", request.prompt or ""), ("system_prompt", request.system_prompt or "")]
        fields += [(f"messages.{i}.content", m.get("content", "")) for i, m in enumerate(request.messages or [])]
        for name, text in fields:
            if len(text) > limit:
                raise RequestError(
                    f"{name}: {len(text)} characters; the limit is {limit} ({CHARS_PER_TOKEN} x maxPromptTokens)",
                    param=name,
                )
        if request.params.max_tokens > self.spec.max_tokens:
            raise RequestError(
                f"max_tokens {request.params.max_tokens} exceeds the server cap {self.spec.max_tokens}",
                param="max_tokens",
            )

    def prepare(self, request: GenerationRequest, rt: Runtime | None = None) -> tuple[str, list[int]]:
        """The rendered prompt and its ids, checked against the limits. CPU-heavy: run it in a worker thread."""
        runtime = rt or self.runtime or _not_ready()
        self._check_length(request)
        text = self.prompt_text(request, runtime)
        ids: list[int] = runtime.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError("the prompt is empty after tokenization", param="messages")
        self._validate(ids, request.params, "prompt" if request.prompt is not None else "messages", runtime)
        return text, ids

    def _validate(self, ids: list[int], params: SamplingParams, field: str, rt: Runtime) -> None:
        """Token limits (413: the request is larger than this server takes; no JSON Schema can say so)."""
        spec = self.spec
        if len(ids) > spec.max_prompt_tokens:
            raise RequestError(f"prompt has {len(ids)} tokens; the limit is {spec.max_prompt_tokens}", 413, field)
        budget = rt.engine.kv_budget_tokens
        if len(ids) + params.max_tokens > budget:
            raise RequestError(
                f"prompt + max_tokens = {len(ids) + params.max_tokens} exceeds the KV budget of {budget} tokens "
                "(inference.kvBudgetTokens)",
                413,
                "max_tokens",
            )
        window = getattr(rt.engine.model.config, "max_position_embeddings", None)
        if window and len(ids) + params.max_tokens > window:
            raise RequestError(
                f"prompt + max_tokens = {len(ids) + params.max_tokens} exceeds the context {window}", 413, "max_tokens"
            )

    def route(self, request: GenerationRequest, rt: Runtime | None = None) -> RouteDecision:
        """Which experts answer `request` (explicit adapter, router, or base). The router reads the request's
        `routing_text` (its last question, without RAG context), as in training, never the rendered prompt."""
        runtime = rt or self.runtime or _not_ready()
        cache, engine = runtime.cache, runtime.engine
        adapter = request.adapter
        if adapter is not None and adapter != AUTO:
            if adapter in BASE_NAMES:
                return RouteDecision([], 1.0, "base")
            if adapter not in cache.active:
                raise RequestError(f"unknown model/adapter {adapter!r}; see GET /v1/models", 404, param="model")
            return RouteDecision([(adapter, 1.0)], 1.0, "explicit")
        router = runtime.router
        if router is None:
            return RouteDecision([], 0.0, "no_router")
        temperature = request.router_temperature or self.spec.router_temperature
        conversation = request_messages(request.messages or [], request.prompt, request.system_prompt)
        if not any(m.get("role") == "user" for m in conversation):  # system turns only: nothing to route on
            return RouteDecision([], 0.0, "no_question")
        question = routing_text(conversation)
        if router.reads_model:  # batched with the other waiting `auto` requests, between decode steps
            gates = runtime.gates((router, question, temperature))
        else:  # TF-IDF reads the text alone: no model, no lock
            gates = router.gates(engine.model, runtime.tokenizer, question, temperature)
        return decide(gates, self.spec.routing_mode, self.spec.confidence_threshold, set(cache.active))

    def lease(self, route: RouteDecision, rt: Runtime | None = None) -> Lease:
        """Pins the route's adapters in device slots (waits while all slots are busy); pair with release()."""
        cache = (rt or self.runtime or _not_ready()).cache
        deadline = time.monotonic() + SLOT_WAIT_SECONDS
        while True:
            try:
                lease = cache.acquire(route.experts)
                self._lease_caches[id(lease)] = cache
                return lease
            except UnknownAdapter as err:
                raise RequestError(f"adapter {err.args[0]!r} was unloaded", 404) from err
            except NoFreeSlot:
                if time.monotonic() > deadline:
                    raise Overloaded("all adapter slots stayed busy") from None
                time.sleep(0.02)

    def release(self, lease: Lease) -> None:
        """Returns a lease to the cache that issued it (the old one if the base switched meanwhile)."""
        cache = self._lease_caches.pop(id(lease), self.cache)
        assert cache is not None
        cache.release(lease)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yields 'start' (after routing), 'text' deltas, then one 'done' with the full result."""
        rt = self.runtime
        if not self.ready or rt is None:
            raise NotReady(self.startup_error or "base model or registry not loaded yet")
        if self.in_flight >= self.spec.max_concurrent_requests:
            raise Overloaded(f"{self.in_flight} requests in flight; the limit is {self.spec.max_concurrent_requests}")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        rt.users += 1
        lease: Lease | None = None
        seq: Sequence | None = None
        try:
            _, ids = await asyncio.to_thread(self.prepare, request, rt)
            route = await asyncio.to_thread(self.route, request, rt)
            lease = await asyncio.to_thread(self.lease, route, rt)
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
            rt.engine.submit(seq)
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield StreamEvent("text", text=value)
                    continue
                if value.startswith("error"):
                    raise GenerationFailed(f"generation failed: {value.removeprefix('error: ')}")
                result = self._result(request_id, seq.text, value, len(ids), len(seq.output_ids), route, lease)
                yield StreamEvent("done", result=result)
                return
        finally:
            if seq is not None and seq.finish_reason is None:
                seq.cancelled = True
            if lease is not None:  # off the event loop: releasing takes the cache lock
                asyncio.get_running_loop().run_in_executor(None, self.release, lease)
            rt.users -= 1
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
