"""Runs a whole evolution cycle in this process: the same stages, configs and cycle graph the
operator uses in-cluster, one stage at a time, with progress and per-stage timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from latentmas.cycle import StageRun, cycle_runs, runnable
from latentmas.spec import KIND, LatentMASStackSpec
from latentmas.stage import StageConfig, manifest_key, run_stage
from latentmas.store import ObjectStore
from pydantic import ValidationError


@dataclass(frozen=True)
class StackDocument:
    """A LatentMASStack as written in YAML for kubectl: the name, namespace and validated spec."""

    name: str
    namespace: str
    spec: LatentMASStackSpec


@dataclass
class StageTiming:
    run: StageRun
    seconds: float
    reused: bool
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class CycleReport:
    cycle_id: str
    timings: list[StageTiming]

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.timings)


def load_stack(path: Path) -> StackDocument:
    """Reads a stack YAML (the same file `kubectl apply` takes); errors name the file and field."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    document = yaml.safe_load(path.read_text())
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


ProgressHook = Callable[[StageRun, str, dict[str, Any] | None], None]


def run_cycle(
    stack: StackDocument,
    cycle_id: str,
    store: ObjectStore,
    on_event: ProgressHook | None = None,
) -> CycleReport:
    """Runs every stage run of the cycle in dependency order; finished stages are reused."""
    done: list[StageRun] = []
    timings: list[StageTiming] = []
    total = len(cycle_runs(stack.spec))
    while len(done) < total:
        ready = runnable(stack.spec, done, [])
        if not ready:
            raise RuntimeError(f"cycle {cycle_id}: no runnable stage after {[r.id for r in done]}")
        run = ready[0]
        if on_event:
            on_event(run, "start", None)
        config = StageConfig(
            namespace=stack.namespace, stack=stack.name, cycle_id=cycle_id, expert=run.expert, spec=stack.spec
        )
        reused = store.exists(stack.spec.storage.artifacts_bucket, manifest_key(config, run.stage))
        clock = time.monotonic()
        manifest = run_stage(run.stage, config, store)
        seconds = float(manifest["durationSeconds"]) if reused else time.monotonic() - clock
        timings.append(StageTiming(run, seconds, reused, manifest["counts"]))
        done.append(run)
        if on_event:
            on_event(run, "reused" if reused else "done", manifest)
    return CycleReport(cycle_id, timings)


def timing_table(report: CycleReport) -> str:
    """Per-stage timings as a markdown table (printed by the CLI, embedded in the report)."""
    lines = [f"cycle {report.cycle_id}: {report.seconds:.1f} s", "", "| stage | seconds | reused |", "|---|---:|---|"]
    lines += [f"| {t.run.id} | {t.seconds:.1f} | {'yes' if t.reused else 'no'} |" for t in report.timings]
    return "\n".join(lines)


def with_local_store(stack: StackDocument, folder: Path) -> StackDocument:
    """The same stack with its object store replaced by a folder (the embedded store of demo/tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    storage = stack.spec.storage.model_copy(update={"endpoint": f"file://{folder.resolve()}"})
    return StackDocument(stack.name, stack.namespace, stack.spec.model_copy(update={"storage": storage}))
