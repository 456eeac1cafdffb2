"""A small but real serving backend for the reasoning API tests: the tiny Llama with two PEFT LoRA
experts (random, non-zero weights), an embedding router over expert descriptions, and a lock that
gives pipelines exclusive use of the model, as the serving engine's step lock does."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from latentmas.jobs.embedding import embed
from latentmas.services.engine_work import Program, drive
from latentmas.services.reasoning_api import ModelAccess, Route
from latentmas.services.text_pipeline import Sampling, peft_adapter_scope, run_single

T = TypeVar("T")
EXPERTS = {
    "finance": "bonds interest rates equity portfolio markets returns inflation",
    "law": "contracts court statutes legal liability lawsuit judge",
}


class TinyBackend:
    def __init__(self, model: Any, tokenizer: Any, embedder: Any, threshold: float = 0.4) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        names = list(EXPERTS)
        self.model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            self.model.add_adapter(name, config)
        self.model.eval()
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.threshold = threshold
        self.names = names
        self.expert_vectors = embed(embedder, [EXPERTS[n] for n in names])
        self.versions = dict.fromkeys(names, 1)
        self.lock = threading.Lock()
        self.scope = peft_adapter_scope(self.model)
        self.passes = 0

    def route(self, prompt: str, requested: str | None) -> Route:
        if requested is not None:
            if requested not in self.versions:
                raise KeyError(requested)
            return Route(requested, 1.0, requested)
        similarity = self.expert_vectors @ embed(self.embedder, [prompt])[0]
        weights = np.exp(similarity / 0.05)
        weights /= weights.sum()
        best = int(weights.argmax())
        adapter = self.names[best] if weights[best] >= self.threshold else None
        return Route(adapter, float(weights[best]), self.names[best])

    def active_versions(self) -> dict[str, int]:
        return dict(self.versions)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def stream(
        self, prompt: str, *, adapter: str | None, max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        ids: list[int] = []
        sent = [""]

        def on_token(_row: int, token: int) -> None:
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(sent[0]):
                loop.call_soon_threadsafe(queue.put_nowait, text[len(sent[0]) :])
                sent[0] = text

        def work(access: ModelAccess) -> None:
            run_single(
                access.model,
                access.tokenizer,
                [prompt],
                Sampling(max_tokens, temperature),
                adapter,
                access.adapter_scope,
                on_token,
            )

        task = asyncio.ensure_future(self.run_exclusive(work, [adapter] if adapter else []))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        while (delta := await queue.get()) is not None:
            yield delta
        await task

    async def run_exclusive(self, fn: Callable[[ModelAccess], T], adapters: Sequence[str]) -> T:
        unknown = set(adapters) - set(self.versions)
        if unknown:
            raise KeyError(f"unknown adapters {sorted(unknown)}")

        def locked() -> T:
            with self.lock:
                return fn(ModelAccess(self.model, self.tokenizer, self.scope))

        return await asyncio.to_thread(locked)

    async def run_program(self, build: Callable[[Any, Any], Program[T]], adapters: Sequence[str]) -> T:
        """Each forward pass under the lock, as the serving engine's `run_exclusive` does."""
        unknown = set(adapters) - set(self.versions)
        if unknown:
            raise KeyError(f"unknown adapters {sorted(unknown)}")

        def execute(fn: Callable[[], Any]) -> Any:
            with self.lock:
                self.passes += 1
                return fn()

        return await asyncio.to_thread(drive, build(self.model, self.tokenizer), self.scope, execute)
