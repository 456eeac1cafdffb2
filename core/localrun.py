"""Runs a whole evolution cycle on this machine: the same stages, configs and cycle graph the operator uses
in-cluster, one stage at a time in this process or independent stages side by side in worker processes, with
progress and per-stage timings."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from latentmas.cycle import StageRun, cycle_runs, runnable
from latentmas.spec import KIND, LatentMASStackSpec
from latentmas.stage import StageConfig, manifest_key, run_stage
from latentmas.store import LocalStore, ObjectStore
from pydantic import ValidationError


@dataclass(frozen=True)
class StackDocument:
    """A LatentMASStack as written in YAML for kubectl: the name, namespace and validated spec."""

    name: str
    namespace: str
    spec: LatentMASStackSpec


@dataclass
class StageTiming:
    """One run of this invocation: `seconds` from its launch (a worker's start included) to its end; a reused
    run's seconds are the time to find its finished manifest, not the time it once took to build."""

    run: StageRun
    seconds: float
    reused: bool
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class CycleReport:
    """A finished local cycle: `wall_seconds` from its first start to its last finish, and each run's own
    seconds (runs overlap, so their sum is more than the wall time)."""

    cycle_id: str
    timings: list[StageTiming]
    wall_seconds: float

    @property
    def stage_seconds(self) -> float:
        return sum(t.seconds for t in self.timings)


def load_document(path: Path, label: str | None = None) -> object:
    """A user's YAML file (JSON when it ends in `.json`), parsed. Every failure is one line that starts with
    `label` (default: the path; e.g. `--config FILE`): a missing file, bytes that are not UTF-8, or the
    syntax error's line, column and the parser's problem."""
    where = label or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or "malformed"
        if err.problem and err.context:
            problem += f" ({err.context}" + (f" from line {err.context_mark.line + 1})" if err.context_mark else ")")
        raise ValueError(f"{where}: invalid YAML{at}: {' '.join(problem.split())}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: invalid YAML: {' '.join(str(err).split())}") from None


def load_stack(path: Path) -> StackDocument:
    """Reads a stack YAML (the same file `kubectl apply` takes); errors name the file and field."""
    document = load_document(path)
    if not isinstance(document, dict) or document.get("kind") != KIND:
        raise ValueError(
            f"{path}: not a {KIND} document (kind: {document.get('kind') if isinstance(document, dict) else None})"
        )
    metadata = document.get("metadata") or {}
    if "name" not in metadata:
        raise ValueError(f"{path}: metadata.name is required")
    try:
        spec = LatentMASStackSpec.model_validate(document.get("spec") or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(["spec", *(str(p) for p in first["loc"])])
        raise ValueError(f"{path}: {where}: {first['msg']}") from None
    return StackDocument(metadata["name"], metadata.get("namespace", "default"), spec)


ProgressHook = Callable[[StageRun, str, StageTiming | None], None]
"""Called with (run, "start", None) when a run starts and (run, "done" | "reused", its timing) when it ends:
the same seconds the timing table prints."""


def stage_threads(running: int) -> int:
    """Torch threads for a stage started while `running` stages (itself included) run: the machine's cores
    shared evenly, at least one — a stage that runs alone (evaluate, router) gets them all."""
    return max(1, (os.cpu_count() or 1) // max(1, running))


def _run_in_child(stage: str, config_json: str, store_root: str, threads: int) -> dict[str, Any]:
    """One stage run in a fresh worker process (spawned, so nothing of the parent's torch state leaks in)."""
    import torch

    torch.set_num_threads(threads)
    return run_stage(stage, StageConfig.model_validate_json(config_json), LocalStore(Path(store_root)))


def run_cycle(
    stack: StackDocument,
    cycle_id: str,
    store: ObjectStore,
    on_event: ProgressHook | None = None,
    parallel: int = 1,
) -> CycleReport:
    """Runs every stage run of the cycle in dependency order; finished stages are reused. With `parallel` > 1
    and an embedded (folder) store, independent runs (index beside training, experts side by side) run at the
    same time in spawned worker processes, the cores shared between them (a run whose manifest exists is only
    checked for reuse, in this process); otherwise one at a time, in-process."""
    with ThreadPoolExecutor(max_workers=1) as single:
        if parallel > 1 and isinstance(store, LocalStore):
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=parallel, mp_context=context, max_tasks_per_child=1) as pool:
                root = str(store.root)

                def launch(run: StageRun, config: StageConfig, threads: int, reused: bool) -> Future[dict[str, Any]]:
                    if reused:  # only its manifest is checked: no worker process (seconds to start) for that
                        return single.submit(run_stage, run.stage, config, store)
                    return pool.submit(_run_in_child, run.stage, config.model_dump_json(), root, threads)

                return _schedule(stack, cycle_id, store, on_event, parallel, launch)
        return _schedule(
            stack,
            cycle_id,
            store,
            on_event,
            1,
            lambda run, config, _, __: single.submit(run_stage, run.stage, config, store),
        )


def stage_config(stack: StackDocument, cycle_id: str, run: StageRun) -> StageConfig:
    return StageConfig(
        namespace=stack.namespace, stack=stack.name, cycle_id=cycle_id, expert=run.expert, spec=stack.spec
    )


Launch = Callable[[StageRun, StageConfig, int, bool], "Future[dict[str, Any]]"]


def _schedule(
    stack: StackDocument,
    cycle_id: str,
    store: ObjectStore,
    on_event: ProgressHook | None,
    parallel: int,
    launch: Launch,
) -> CycleReport:
    """Keeps up to `parallel` runnable stage runs going (`launch` starts one with a thread count) until all
    are done, reporting each start and finish; a failed run raises once the runs beside it are collected."""
    done: list[StageRun] = []
    timings: list[StageTiming] = []
    total = len(cycle_runs(stack.spec))
    running: dict[Future[dict[str, Any]], tuple[StageRun, bool, float]] = {}
    begun = time.monotonic()
    while len(done) < total:
        started = [run for run, _, _ in running.values()]
        ready = runnable(stack.spec, done, started)[: parallel - len(running)]
        threads = stage_threads(len(running) + len(ready))
        for run in ready:
            if on_event:
                on_event(run, "start", None)
            config = stage_config(stack, cycle_id, run)
            reused = store.exists(stack.spec.storage.artifacts_bucket, manifest_key(config, run.stage))
            running[launch(run, config, threads, reused)] = (run, reused, time.monotonic())
        if not running:
            raise RuntimeError(f"cycle {cycle_id}: no runnable stage after {[r.id for r in done]}")
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            run, reused, clock = running.pop(future)
            manifest = future.result()
            timing = StageTiming(run, time.monotonic() - clock, reused, manifest["counts"])
            timings.append(timing)
            done.append(run)
            if on_event:
                on_event(run, "reused" if reused else "done", timing)
    return CycleReport(cycle_id, timings, time.monotonic() - begun)


def timing_table(report: CycleReport) -> str:
    """Per-stage timings as a markdown table (printed by the CLI, embedded in the report)."""
    wall, runs = report.wall_seconds, report.stage_seconds
    head = f"cycle {report.cycle_id}: {wall:.1f} s wall ({runs:.1f} s of stage runs, overlapping)"
    lines = [head, "", "| stage | seconds | reused |", "|---|---:|---|"]
    lines += [f"| {t.run.id} | {t.seconds:.1f} | {'yes' if t.reused else 'no'} |" for t in report.timings]
    return "\n".join(lines)


def with_local_store(stack: StackDocument, folder: Path) -> StackDocument:
    """The same stack with its object store replaced by a folder (the embedded store of demo/tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    storage = stack.spec.storage.model_copy(update={"endpoint": f"file://{folder.resolve()}"})
    return StackDocument(stack.name, stack.namespace, stack.spec.model_copy(update={"storage": storage}))
