"""The evolution cycle as a graph of stage runs: a pure function of the spec, shared by the operator
(one Job per run) and the local runner (`latentmas cycle run --local`, `latentmas demo`)."""

from __future__ import annotations

from collections.abc import Collection
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


def upstream(run: StageRun, spec: LatentMASStackSpec) -> list[StageRun]:
    """The runs that must have finished before `run` may start."""
    needed = set(DEPENDENCIES[run.stage])
    return [r for r in cycle_runs(spec) if r.stage in needed]


def runnable(spec: LatentMASStackSpec, done: Collection[StageRun], started: Collection[StageRun]) -> list[StageRun]:
    """Runs whose inputs are all done and which have not started: what to launch next."""
    finished, begun = set(done), set(started) | set(done)
    return [r for r in cycle_runs(spec) if r not in begun and all(u in finished for u in upstream(r, spec))]
