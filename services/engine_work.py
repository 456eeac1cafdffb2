"""The interface between latent multi-agent work and the serving engine's loop.

A latent request batch is a *program*: a generator that yields one `WorkItem` before each forward pass
it is about to run (a thinker's prompt prefill, one latent step, the Judger's prefill, one decode step)
and returns its result when done. Whoever drives it resumes it once per item, inside the engine's step
lock and with the item's adapter selected, so the engine's own decoding interleaves with latent work
between passes instead of waiting for a whole pipeline. `drive` is the reference driver; the serving
engine's loop may schedule items itself (e.g. several programs' latent steps side by side), as long as
it resumes each program with exactly the adapter and lock its item names."""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

Phase = Literal["prefill", "latent_step", "decode"]
AdapterScope = Callable[[str | None, int], AbstractContextManager[Any]]
"""(adapter or None for the base model, batch size) -> a context in which forward passes use that adapter."""
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class WorkItem:
    """The next forward pass of a program: its phase, the agent and adapter it runs for, the rows in the
    batch, the new positions per row it adds to the cache, and whether it needs the LM head (latent steps
    and thinker prefills do not: only the last hidden state is read)."""

    phase: Phase
    agent: str
    adapter: str | None
    rows: int
    positions: int
    lm_head: bool


Program = Generator[WorkItem, None, T]
Executor = Callable[[Callable[[], Any]], Any]
"""Runs one callable with the model to itself (the engine's `run_exclusive`: step lock + inference mode)."""


def direct(fn: Callable[[], R]) -> R:
    """The executor when the caller already owns the model (tests, benchmarks, a held lock)."""
    return fn()


@dataclass(frozen=True)
class _Done:
    value: Any


def drive(program: Program[T], scope: AdapterScope, execute: Executor = direct) -> T:
    """Runs a program to its end: every forward pass through `execute` and under its item's adapter."""
    item = next(program)  # everything before the first pass is tokenisation, no model access
    while True:

        def step(current: WorkItem = item) -> WorkItem | _Done:
            with scope(current.adapter, current.rows):
                try:
                    return next(program)
                except StopIteration as stop:
                    return _Done(stop.value)

        outcome = execute(step)
        if isinstance(outcome, _Done):
            return cast(T, outcome.value)
        item = outcome
