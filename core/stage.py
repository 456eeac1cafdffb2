"""The stage contract (DESIGN §4): typed config in, artifacts under
`<artifacts>/<namespace>/<stack>/cycles/<cycle>/<stage>/`, and `_manifest.json` written last as the
commit marker. The manifest records the stage's recipe identity (the hash of the spec slice it builds
from, its inputs' manifests and the stack uid): running a finished stage again is a no-op only when that
identity matches, and is refused in one line otherwise (artifacts of another recipe are never reused or
overwritten in place; a new recipe runs under a new cycle id)."""

from __future__ import annotations

import importlib
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from latentmas.cycle import StageRun, upstream
from latentmas.recipe import digest, recipe_hash
from latentmas.spec import NAME_PATTERN, LatentMASStackSpec, SpecModel
from latentmas.store import ObjectStore, open_store, sha256_bytes, sha256_object
from pydantic import Field

MANIFEST = "_manifest.json"
PROGRESS = "_progress.json"
OWNER = "_stack.json"
STATUS_SUMMARY = "statusSummary"  # a manifest metric: one line the operator shows as the stage's status message
log = logging.getLogger("latentmas.stage")

# Stage name -> "module:function", in cycle order. Imported only when run, so `latentmas --help`
# never loads torch or Spark. Each stage module adds its line here.
STAGES: dict[str, str] = {
    "clean": "latentmas.jobs.clean:run",
    "quant": "latentmas.jobs.quant:run",
    "synth": "latentmas.jobs.synth:run",
    "index": "latentmas.jobs.index:run",
    "base": "latentmas.training.base:base_stage",
    "train": "latentmas.training.sft:train_stage",
    "router": "latentmas.training.router:router_stage",
    "evaluate": "latentmas.training.evaluate:evaluate_stage",
    "promote": "latentmas.training.promote:promote_stage",
}


class StageConfig(SpecModel):
    """What `latentmas stage run <stage> --config FILE` reads (a ConfigMap key in-cluster)."""

    namespace: str = Field("default", pattern=NAME_PATTERN)
    stack: str = Field(pattern=NAME_PATTERN)
    cycle_id: str = Field(pattern=NAME_PATTERN)
    expert: str | None = Field(None, description="For per-expert stages (train): which expert.")
    stack_uid: str | None = Field(None, description="metadata.uid of the stack (in-cluster); part of the identity.")
    input_cycles: dict[str, str] = Field(
        default_factory=dict,
        description="Run id -> the earlier cycle whose artifacts this cycle reuses for that run (unchanged recipe).",
    )
    spec: LatentMASStackSpec


def load_stage_config(data: object, where: str) -> StageConfig:
    """A StageConfig, or one line naming every field that is wrong. Unknown fields are refused, not
    ignored (they could change what a stage builds): they mean a newer operator wrote the config than
    this stage image, so the line says to run the operator's matching image."""
    from importlib.metadata import PackageNotFoundError, version

    from pydantic import ValidationError

    try:
        return StageConfig.model_validate(data)
    except ValidationError as err:
        problems = [(".".join(str(p) for p in e["loc"]) or "the document", e) for e in err.errors()]
        unknown = [loc for loc, e in problems if e["type"] == "extra_forbidden"]
        other = [f"{loc}: {e['msg']}" for loc, e in problems if e["type"] != "extra_forbidden"]
        if unknown:
            try:
                mine = version("latentmas")
            except PackageNotFoundError:
                mine = "unknown"
            other.insert(
                0,
                f"unknown field(s) {', '.join(unknown)}: written by a newer operator than this stage image "
                f"(latentmas {mine}); run the stage image of the operator's release",
            )
        raise ValueError(f"{where}: {'; '.join(other)}") from None


def stage_prefix(namespace: str, stack: str, cycle_id: str, stage: str, expert: str | None = None) -> str:
    """`<ns>/<stack>/cycles/<cycle>/<stage>/[<expert>/]`: per-expert stages get a sub-folder."""
    sub = f"{stage}/{expert}/" if expert else f"{stage}/"
    return f"{namespace}/{stack}/cycles/{cycle_id}/{sub}"


def owner_key(namespace: str, stack: str) -> str:
    """`<ns>/<stack>/_stack.json`: which stack instance (uid) the stack-level artifacts belong to."""
    return f"{namespace}/{stack}/{OWNER}"


def manifest_key(config: StageConfig, stage: str) -> str:
    return stage_prefix(config.namespace, config.stack, config.cycle_id, stage, config.expert) + MANIFEST


@dataclass(frozen=True)
class StageResult:
    """What a stage reports; outputs are object keys (relative to the stage prefix) it wrote.
    `skipped` is the reason when the stage had nothing to do (e.g. an expert whose domain has no
    data): the run still succeeds and its manifest says `skipped: true` with that reason."""

    outputs: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None


def skipped(reason: str) -> StageResult:
    """The result of a run that had nothing to do, and why."""
    return StageResult(outputs=[], skipped=reason)


@dataclass
class StageContext:
    stage: str
    config: StageConfig
    store: ObjectStore
    workdir: Path

    @property
    def spec(self) -> LatentMASStackSpec:
        return self.config.spec

    @property
    def bucket(self) -> str:
        return self.spec.storage.artifacts_bucket

    @property
    def raw_bucket(self) -> str:
        return self.spec.storage.raw_bucket

    def prefix(self, stage: str | None = None, expert: str | None = None) -> str:
        """Where a stage's artifacts live for this cycle (this stage's own when `stage` is None): an upstream
        run this cycle reuses is read from the cycle that built it (`input_cycles`)."""
        cycle = self.config.cycle_id
        if stage is None:
            stage, expert = self.stage, self.config.expert
        elif (stage, expert) != (self.stage, self.config.expert):
            cycle = self.config.input_cycles.get(f"{stage}-{expert}" if expert else stage, cycle)
        return stage_prefix(self.config.namespace, self.config.stack, cycle, stage, expert)

    def key(self, name: str) -> str:
        return self.prefix() + name

    def put_json(self, name: str, value: Any) -> str:
        self.store.put_bytes(self.bucket, self.key(name), json.dumps(value, indent=2, sort_keys=True).encode())
        return name

    def skip_reason(self, stage: str, expert: str | None = None) -> str | None:
        """Why an upstream run was skipped, or None when it ran (it must have finished)."""
        manifest = self.read_manifest(stage, expert)
        return str(manifest.get("skipReason", "skipped")) if manifest.get("skipped") else None

    def read_manifest(self, stage: str, expert: str | None = None) -> dict[str, Any]:
        """The manifest of an upstream stage; a clear error if that stage has not finished."""
        key = self.prefix(stage, expert) + MANIFEST
        if not self.store.exists(self.bucket, key):
            raise RuntimeError(f"stage {stage!r} has not finished: {self.bucket}/{key} is missing")
        return dict(json.loads(self.store.get_bytes(self.bucket, key)))

    def progress(self, step: int, total: int, **fields: Any) -> None:
        """Progress the operator can report (and a log line for people watching the Job)."""
        record = {"step": step, "total": total, "time": time.time(), **fields}
        self.put_json(PROGRESS, record)
        extras = " ".join(f"{k}={v}" for k, v in fields.items())
        log.info("%s progress %d/%d %s", self.stage, step, total, extras)


class RecipeMismatch(RuntimeError):
    """A finished stage's manifest was built from another recipe, inputs or stack than asked for."""


def stage_identity(ctx: StageContext) -> dict[str, Any]:
    """What a stage's artifacts are a function of: its recipe slice, its inputs' manifests, the stack uid."""
    config = ctx.config
    inputs: dict[str, str | None] = {}
    for run in upstream(StageRun(ctx.stage, config.expert), config.spec):
        key = ctx.prefix(run.stage, run.expert) + MANIFEST
        exists = ctx.store.exists(ctx.bucket, key)
        inputs[run.id] = sha256_bytes(ctx.store.get_bytes(ctx.bucket, key)) if exists else None
    identity: dict[str, Any] = {
        "stage": recipe_hash(config.spec, ctx.stage, config.expert),
        "inputs": inputs,
        "stackUid": config.stack_uid,
    }
    return {"hash": digest(identity), **identity}


def check_reuse(ctx: StageContext, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raises `RecipeMismatch` (one line) unless `manifest` was built from exactly `identity`."""
    where = f"{ctx.bucket}/{ctx.key(MANIFEST)}"
    recorded = manifest.get("recipe")
    if not isinstance(recorded, dict) or "hash" not in recorded:
        raise RecipeMismatch(f"{where} records no recipe hash (written by an older release); use a new cycle id")
    if recorded["hash"] == identity["hash"]:
        return
    labels = {"stage": "stage config", "inputs": "input manifests", "stackUid": "stack uid"}
    differs = ", ".join(label for part, label in labels.items() if recorded.get(part) != identity[part])
    raise RecipeMismatch(
        f"{where} was built from another recipe ({differs or 'identity'} differ: "
        f"{recorded['hash']} != {identity['hash']}); use a new cycle id"
    )


def resolve(name: str) -> Callable[[StageContext], StageResult]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(sorted(STAGES))}")
    module, _, attr = STAGES[name].partition(":")
    fn: Callable[[StageContext], StageResult] = getattr(importlib.import_module(module), attr)
    return fn


@contextmanager
def stage_context(stage: str, config: StageConfig, store: ObjectStore | None = None) -> Iterator[StageContext]:
    with tempfile.TemporaryDirectory(prefix=f"latentmas-{stage}-") as tmp:
        yield StageContext(stage, config, store or open_store(config.spec.storage), Path(tmp))


def run_stage(stage: str, config: StageConfig, store: ObjectStore | None = None) -> dict[str, Any]:
    """Runs one stage, or reuses its finished manifest when the identity matches exactly (else
    `RecipeMismatch`); writes the manifest last and returns it."""
    fn = resolve(stage)
    with stage_context(stage, config, store) as ctx:
        manifest_key = ctx.key(MANIFEST)
        identity = stage_identity(ctx)
        if ctx.store.exists(ctx.bucket, manifest_key):
            existing = dict(json.loads(ctx.store.get_bytes(ctx.bucket, manifest_key)))
            check_reuse(ctx, existing, identity)
            log.info("%s already done (%s/%s, recipe %s)", stage, ctx.bucket, manifest_key, identity["hash"])
            return existing
        ctx.store.ensure_bucket(ctx.bucket)
        started = datetime.now(UTC)
        clock = time.monotonic()
        result = fn(ctx)
        outputs = []
        for name in result.outputs:
            size, checksum = sha256_object(ctx.store, ctx.bucket, ctx.key(name))
            outputs.append({"key": name, "size": size, "sha256": checksum})
        manifest = {
            "stage": stage,
            "namespace": config.namespace,
            "stack": config.stack,
            "cycle": config.cycle_id,
            "expert": config.expert,
            "recipe": identity,
            "startedAt": started.isoformat(),
            "finishedAt": datetime.now(UTC).isoformat(),
            "durationSeconds": round(time.monotonic() - clock, 3),
            "outputs": outputs,
            "counts": result.counts,
            "metrics": result.metrics,
            "versions": {"python": platform.python_version(), **result.versions},
            "skipped": result.skipped is not None,
        }
        if result.skipped is not None:
            manifest["skipReason"] = result.skipped
        ctx.put_json(MANIFEST, manifest)
        return manifest
