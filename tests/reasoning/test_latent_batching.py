"""Serving latent work: a latent request is an engine program that takes the model one forward pass at
a time (so other work interleaves), never runs the LM head while thinking, and concurrent requests with
equal settings run as one padded batch whose rows equal the requests run alone."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest
from latentmas.services.engine_work import WorkItem, drive
from latentmas.services.latent_batch import BatchKey, LatentBatcher
from latentmas.services.latent_pipeline import LatentConfig, latent_program, run_latent, with_adapter
from latentmas.services.text_pipeline import DEFAULT_AGENTS, PipelineResult, Sampling, no_adapter_scope

pytestmark = pytest.mark.reasoning
TOL = 1e-4
QUESTIONS = ["Why do bond prices fall?", "Plan a bond ladder for a retiree.", "What is duration?"]


def test_program_takes_the_model_one_pass_at_a_time_and_thinks_without_the_lm_head(tiny_lm):
    model, tokenizer = tiny_lm
    head_calls: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: head_calls.append(out.shape[1]))
    items: list[WorkItem] = []
    executed: list[int] = []

    def execute(fn: Any) -> Any:
        executed.append(1)
        return fn()

    def observe(program: Any) -> Generator[WorkItem, None, PipelineResult]:
        while True:
            try:
                item = next(program)
            except StopIteration as stop:
                return stop.value
            items.append(item)
            yield item

    try:
        program = latent_program(model, tokenizer, QUESTIONS[:2], Sampling(max_new_tokens=5), LatentConfig(3))
        result: PipelineResult = drive(observe(program), no_adapter_scope, execute)
    finally:
        handle.remove()
    assert len(executed) == len(items) == result.forward_passes
    thinking = [i for i in items if i.agent != "Judger"]
    assert [i.phase for i in thinking] == (["prefill"] + ["latent_step"] * 3) * 3
    assert not any(i.lm_head for i in thinking) and all(i.lm_head for i in items if i.agent == "Judger")
    assert all(i.rows == 2 for i in items)
    # The LM head ran only for the Judger: its prefill and each decode step.
    assert len(head_calls) == result.agents[-1].forward_passes


def test_concurrent_latent_requests_run_as_one_batch_with_single_run_results(backend):
    key = BatchKey(Sampling(max_new_tokens=6), LatentConfig(2), tuple(with_adapter(DEFAULT_AGENTS, "finance")))
    other = BatchKey(Sampling(max_new_tokens=6), LatentConfig(3), key.agents)
    batcher = LatentBatcher(backend.run_program, max_batch=8)
    streamed: dict[int, list[int]] = {i: [] for i in range(len(QUESTIONS))}

    def sink(index: int) -> Any:
        return lambda _tokenizer, token: streamed[index].append(token)

    async def ask_all() -> list[Any]:
        same = [batcher.submit(key, q, sink(i)) for i, q in enumerate(QUESTIONS)]
        return await asyncio.gather(*same, batcher.submit(other, QUESTIONS[0]))

    passes_before = backend.passes
    *rows, different = asyncio.run(ask_all())
    assert batcher.batches == 2  # the three equal-key requests shared one batch; the other key ran apart
    batched_passes = backend.passes - passes_before
    for index, (question, row) in enumerate(zip(QUESTIONS, rows, strict=True)):
        with backend.lock:
            alone = run_latent(
                backend.model, backend.tokenizer, [question], key.sampling, key.config, key.agents, backend.scope
            )
        assert row.tokens[0] == alone.tokens[0] == streamed[index]
        assert row.texts == alone.texts
        assert (row.first_logits - alone.first_logits).abs().max().item() <= TOL
        assert row.agents[-1].prompt_tokens == alone.agents[-1].prompt_tokens
    with backend.lock:
        alone = run_latent(
            backend.model, backend.tokenizer, [QUESTIONS[0]], other.sampling, other.config, other.agents, backend.scope
        )
    assert different.tokens == alone.tokens
    # One batch of three takes far fewer forward passes than three runs: the thinking is shared.
    assert batched_passes < sum(r.forward_passes for r in rows) + different.forward_passes


def test_failed_batch_fails_each_of_its_requests(backend):
    key = BatchKey(Sampling(max_new_tokens=2), LatentConfig(1), tuple(with_adapter(DEFAULT_AGENTS, "nope")))
    batcher = LatentBatcher(backend.run_program)

    async def ask() -> list[Any]:
        return await asyncio.gather(*(batcher.submit(key, q) for q in QUESTIONS[:2]), return_exceptions=True)

    outcomes = asyncio.run(ask())
    assert len(outcomes) == 2 and all(isinstance(o, KeyError) for o in outcomes)
