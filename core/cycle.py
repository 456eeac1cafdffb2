"""The evolution cycle as a graph of stage runs: a pure function of the spec, shared by the operator
(one Job per run) and the local runner (`latentmas cycle run --local`, `latentmas demo`)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from latentmas.spec import LatentMASStackSpec

# Stage -> the stages it reads. "train" and per-expert stages expand to one run per expert.
DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "clean": (),
    "quant": ("clean",),
    "synth": ("clean", "quant"),
    "index": ("clean",),
    "base": ("clean",),
    "train": ("synth", "base"),
    "router": ("synth", "base"),
    "evaluate": ("train", "router"),
    "promote": ("evaluate", "index"),
}
PER_EXPERT = frozenset({"train"})


@dataclass(frozen=True, order=True)
class StageRun:
    stage: str
    expert: str | None = None

    @property
    def id(self) -> str:
        """Unique within a cycle; used in Job names and status keys."""
        return f"{self.stage}-{self.expert}" if self.expert else self.stage


def cycle_runs(spec: LatentMASStackSpec) -> list[StageRun]:
    """Every run of one cycle, in a valid order."""
    runs: list[StageRun] = []
    for stage in DEPENDENCIES:
        if stage in PER_EXPERT:
            runs.extend(StageRun(stage, expert.name) for expert in spec.experts)
        else:
            runs.append(StageRun(stage))
    return runs


def stage_inputs(stage: str, spec: LatentMASStackSpec) -> tuple[str, ...]:
    """The stages `stage` reads with this spec: `DEPENDENCIES`, plus quant for an index that boosts hits by
    quant's document quality (`pipeline.rag.qualityBoost` > 0)."""
    if stage == "index" and spec.pipeline.rag.quality_boost > 0:
        return (*DEPENDENCIES[stage], "quant")
    return DEPENDENCIES.get(stage, ())


def upstream(run: StageRun, spec: LatentMASStackSpec) -> list[StageRun]:
    """The runs that must have finished before `run` may start."""
    needed = set(stage_inputs(run.stage, spec))
    return [r for r in cycle_runs(spec) if r.stage in needed]


def raw_digest(listing: Iterable[tuple[str, str]]) -> str:
    """Identity of the raw data a cycle starts from: its (key, ETag) pairs, in key order. The clean stage
    records it; the operator ends a cycle on unchanged (or empty) data as NoNewData."""
    text = "\n".join(f"{key}\t{etag}" for key, etag in sorted(listing))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def runnable(spec: LatentMASStackSpec, done: Collection[StageRun], started: Collection[StageRun]) -> list[StageRun]:
    """Runs whose inputs are all done and which have not started: what to launch next."""
    finished, begun = set(done), set(started) | set(done)
    return [r for r in cycle_runs(spec) if r not in begun and all(u in finished for u in upstream(r, spec))]
