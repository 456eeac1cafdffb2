"""Builds the reasoning app around the stand-in backend, and publishes index bundles the way promotion
does (versioned files with checksums, then registry.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from latentmas.jobs.retrieval import HybridRetriever
from latentmas.registry import ArtifactVersion, load_registry, save_registry, version_prefix
from latentmas.services.reasoning_api import ReasoningService, ReasoningSettings, create_reasoning_router
from latentmas.store import LocalStore, sha256_file

BUCKET, NAMESPACE, STACK = "artifacts", "default", "demo"


def publish_index(store: LocalStore, embedder: Any, texts: dict[str, str], workdir: Path) -> int:
    registry = load_registry(store, BUCKET, NAMESPACE, STACK)
    version = registry.index.next_version()
    folder = workdir / f"bundle-v{version}"
    HybridRetriever.from_texts(list(texts.values()), list(texts), embedder).save(folder)
    prefix = version_prefix(NAMESPACE, STACK, "index", "main", version)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        store.put_file(BUCKET, prefix + name, path)
        files[name] = sha256_file(path)
    registry.index.history.append(ArtifactVersion(version=version, prefix=prefix, files=files))
    registry.index.current = version
    save_registry(store, BUCKET, NAMESPACE, STACK, registry)
    return version


def build_app(service: ReasoningService) -> FastAPI:
    """The reasoning router with the serving app's error handling (one JSON error body, 400 for invalid)."""
    from latentmas.services.http_errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(create_reasoning_router(service))
    return app


def service_for(backend: Any, sessions: Any, **kwargs: Any) -> ReasoningService:
    settings = kwargs.pop("settings", ReasoningSettings())
    return ReasoningService(backend, sessions, settings=settings, **kwargs)


def prefills(model: Any, tokenizer: Any, run: Any) -> tuple[Any, list[str]]:
    """Runs `run()` and returns its result and the text of every multi-token prompt the model read
    (row 0's), in order. `model` is a causal LM whose `.model` is the decoder (PEFT: its base model)."""
    seen: list[str] = []

    def spy(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen.append(tokenizer.decode(ids[0].tolist()))

    handle = model.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        return run(), seen
    finally:
        handle.remove()
