"""Concurrent latent requests batched with each other.

Requests with the same settings (`BatchKey`: decoding, latent config, agents and their adapters, answer
format) that arrive while a batch of that key is running wait and go together, up to `max_batch`, into
the next one: one padded `latent_program` (a padded batch gives each row exactly its single-question
result). Batches of different keys run side by side; the engine interleaves their forward passes,
since a program takes the model only one pass at a time (`engine_work`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from latentmas.services.agent_prompts import DEFAULT_PROMPTS, AnswerFormat, PromptSet
from latentmas.services.engine_work import Program
from latentmas.services.latent_pipeline import LatentConfig, latent_program
from latentmas.services.text_pipeline import Agent, PipelineResult, Sampling

RowTokens = Callable[[Any, int], None]
"""Receives (tokenizer, token id) for each token one row emits, in order."""
ProgramRunner = Callable[[Callable[[Any, Any], Program[PipelineResult]], Sequence[str]], Awaitable[PipelineResult]]
"""`ReasoningBackend.run_program`: (program factory taking model and tokenizer, its adapters) -> result."""


@dataclass(frozen=True)
class BatchKey:
    """Everything besides the question that decides a latent answer; equal keys can share a batch."""

    sampling: Sampling
    config: LatentConfig
    agents: tuple[Agent, ...]
    answer: AnswerFormat = "free"
    prompts: PromptSet = DEFAULT_PROMPTS

    @property
    def adapters(self) -> list[str]:
        return [a for a in dict.fromkeys(agent.adapter for agent in self.agents) if a is not None]


@dataclass
class _Job:
    question: str
    on_token: RowTokens | None
    future: asyncio.Future[PipelineResult]


@dataclass
class LatentBatcher:
    run: ProgramRunner
    max_batch: int = 8
    batches: int = 0
    """Batches run so far (for tests and metrics)."""
    _pending: dict[BatchKey, list[_Job]] = field(default_factory=dict)
    _workers: dict[BatchKey, asyncio.Task[None]] = field(default_factory=dict)

    async def submit(self, key: BatchKey, question: str, on_token: RowTokens | None = None) -> PipelineResult:
        """This question's result (`PipelineResult.row`), computed in a batch with concurrent equal-key ones."""
        future: asyncio.Future[PipelineResult] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(_Job(question, on_token, future))
        worker = self._workers.get(key)
        if worker is None or worker.done():
            self._workers[key] = asyncio.ensure_future(self._drain(key))
        return await future

    async def _drain(self, key: BatchKey) -> None:
        while queued := self._pending.pop(key, []):
            jobs, rest = queued[: self.max_batch], queued[self.max_batch :]
            if rest:
                self._pending[key] = rest
            jobs = [job for job in jobs if not job.future.done()]  # a client that went away
            if not jobs:
                continue
            self.batches += 1
            try:
                result = await self.run(self._factory(key, jobs), key.adapters)
            except Exception as err:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            for row, job in enumerate(jobs):
                if not job.future.done():
                    job.future.set_result(result.row(row))

    @staticmethod
    def _factory(key: BatchKey, jobs: list[_Job]) -> Callable[[Any, Any], Program[PipelineResult]]:
        def build(model: Any, tokenizer: Any) -> Program[PipelineResult]:
            def relay(row: int, token: int) -> None:
                callback = jobs[row].on_token
                if callback is not None:
                    callback(tokenizer, token)

            questions = [job.question for job in jobs]
            return latent_program(
                model,
                tokenizer,
                questions,
                key.sampling,
                key.config,
                key.agents,
                relay,
                answer=key.answer,
                prompts=key.prompts,
            )

        return build
