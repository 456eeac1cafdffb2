"""What one inference server needs to start: the stack's identity, its storage and inference sections of
the spec (the one config model), and process-level knobs that are not part of the spec."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from latentmas.spec import BaseModelSpec, InferenceSpec, LatentMASStackSpec, StorageSpec

TOKEN_ENV = "LATENTMAS_API_TOKEN"
PREFILL_CHUNK_ENV = "LATENTMAS_PREFILL_CHUNK_TOKENS"
COMPILE_DECODE_ENV = "LATENTMAS_COMPILE_DECODE"
DEFAULT_ROUTERS = ("latentmas.services.reasoning_api:router",)


def _env_count(name: str, default: int) -> int:
    """A positive whole number from the environment, or `default` when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}: {value!r} is not a positive whole number")
    return int(value)


@dataclass
class ServeSettings:
    namespace: str
    stack: str
    storage: StorageSpec
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    base_model: BaseModelSpec = field(default_factory=BaseModelSpec)
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get("LATENTMAS_CACHE", "/tmp/latentmas-serve")))
    device: str = "auto"
    auth_token: str | None = field(default_factory=lambda: os.environ.get(TOKEN_ENV) or None)
    routers: tuple[str, ...] = DEFAULT_ROUTERS
    notifications: bool = True  # MinIO listen_bucket_notification; ETag polling runs either way
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before anything reads them
    seed: int = 0
    # joining prompts are prefilled this many columns per engine step
    prefill_chunk_tokens: int = field(default_factory=lambda: _env_count(PREFILL_CHUNK_ENV, 512))
    # auto (CUDA graphs on CUDA, eager on CPU) | off | a torch.compile mode
    compile_decode: str = field(default_factory=lambda: os.environ.get(COMPILE_DECODE_ENV, "auto"))

    @classmethod
    def from_spec(cls, namespace: str, stack: str, spec: LatentMASStackSpec, **overrides: object) -> ServeSettings:
        return cls(
            namespace=namespace,
            stack=stack,
            storage=spec.storage,
            inference=spec.inference,
            base_model=spec.base_model,
            **overrides,  # type: ignore[arg-type]
        )
