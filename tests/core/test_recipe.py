"""Recipe vs execution markers and exact-match stage reuse: every spec field is marked, operational edits
never change a recipe hash, a recipe edit changes only the stages that depend on it, and `run_stage`
reuses a finished stage only when its recorded identity (recipe slice, inputs, stack uid) matches."""

from __future__ import annotations

import json
from typing import Any

import pytest
from latentmas.cycle import DEPENDENCIES, StageRun, cycle_runs, runnable
from latentmas.operator.plan import reusable_runs
from latentmas.recipe import MARKERS, nested_model, recipe_hash
from latentmas.spec import BuiltRun, LatentMASStackSpec
from latentmas.stage import MANIFEST, STAGES, RecipeMismatch, StageConfig, StageContext, StageResult, run_stage
from latentmas.testing.fixtures import MinioFixture
from pydantic import BaseModel

pytestmark = pytest.mark.harness
CALLS: list[tuple[str, str]] = []


def _leaf_fields(root: type[BaseModel]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    todo, seen = [root], set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            inner = nested_model(info.annotation)
            if inner is None:
                found.add((model.__name__, name))
            else:
                todo.append(inner)
    return found


def test_every_spec_field_is_marked_recipe_or_execution() -> None:
    leaves = _leaf_fields(LatentMASStackSpec)
    marked = {(model, name) for model, fields in MARKERS.items() for name in fields}
    assert sorted(leaves - marked) == [], "unmarked spec fields: mark them in latentmas/recipe.py"
    assert sorted(marked - leaves) == [], "stale markers for fields that no longer exist"
    stages = {stage for fields in MARKERS.values() for marker in fields.values() for stage in marker}
    assert stages <= set(DEPENDENCIES), f"unknown stages in markers: {stages - set(DEPENDENCIES)}"


def _spec(**overrides: Any) -> LatentMASStackSpec:
    body: dict[str, Any] = {"experts": [{"name": "law", "domain": "law"}, {"name": "med", "domain": "med"}]}
    for path, value in overrides.items():
        node = body
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return LatentMASStackSpec.model_validate(body)


def _hashes(spec: LatentMASStackSpec) -> dict[str, str]:
    return {run.id: recipe_hash(spec, run.stage, run.expert) for run in cycle_runs(spec)} | {"cycle": recipe_hash(spec)}


@pytest.mark.parametrize(
    "path,value",
    [
        ("pipeline.training.image", "registry.example/latentmas:9.9"),
        ("pipeline.training.resources", {"cpu": "8", "memory": "64Gi", "gpu": 2}),
        ("pipeline.retry", {"retries": 7, "backoffSeconds": 1, "deadlineSeconds": 99}),
        ("pipeline.cleaning.sparkExecutors", 12),
        ("inference.replicas", 5),
        ("inference.maxTokens", 77),
        ("nodeSelector", {"pool": "gpu"}),
        ("schedule", {"cron": "0 3 * * *"}),
    ],
)
def test_operational_fields_change_no_recipe_hash(path: str, value: Any) -> None:
    assert _hashes(_spec(**{path: value})) == _hashes(_spec())


@pytest.mark.parametrize(
    "path,value,changed",
    [
        ("pipeline.cleaning.minChars", 5, {"clean", "cycle"}),
        ("pipeline.rag.fusion", "weighted", {"index", "cycle"}),
        ("pipeline.training.routerEpochs", 3, {"router", "cycle"}),
        ("inference.routingMode", "soft", {"evaluate", "cycle"}),
        ("evaluation.minImprovement", 0.5, {"promote", "cycle"}),
        ("baseModel.dtype", "bfloat16", {"base", "train-law", "train-med", "cycle"}),
    ],
)
def test_a_recipe_field_changes_only_the_stages_that_build_from_it(path: str, value: Any, changed: set[str]) -> None:
    before, after = _hashes(_spec()), _hashes(_spec(**{path: value}))
    assert {run for run in before if before[run] != after[run]} == changed


def test_an_experts_own_fields_change_only_its_own_training_run() -> None:
    edited = _spec(experts=[{"name": "law", "domain": "law", "lora": {"rank": 4}}, {"name": "med", "domain": "med"}])
    before, after = _hashes(_spec()), _hashes(edited)
    assert {run for run in before if before[run] != after[run]} == {"train-law", "cycle"}


def upstream_stage(ctx: StageContext) -> StageResult:
    """A small real stage standing in for `clean`: copies the raw object list with the configured bound."""
    CALLS.append((ctx.config.cycle_id, ctx.stage))
    keys = sorted(o.key for o in ctx.store.list(ctx.raw_bucket))
    ctx.put_json("docs.json", {"keys": keys, "minChars": ctx.spec.pipeline.cleaning.min_chars})
    return StageResult(outputs=["docs.json"], counts={"documents": len(keys)})


def downstream_stage(ctx: StageContext) -> StageResult:
    """Stands in for `quant`: reads its input stage's output."""
    CALLS.append((ctx.config.cycle_id, ctx.stage))
    ctx.read_manifest("clean")
    docs = json.loads(ctx.store.get_bytes(ctx.bucket, ctx.prefix("clean") + "docs.json"))
    ctx.put_json("quant.json", {"n": len(docs["keys"])})
    return StageResult(outputs=["quant.json"])


@pytest.fixture
def small_stages(monkeypatch: pytest.MonkeyPatch, minio: MinioFixture) -> MinioFixture:
    monkeypatch.setitem(STAGES, "clean", f"{__name__}:upstream_stage")
    monkeypatch.setitem(STAGES, "quant", f"{__name__}:downstream_stage")
    minio.store.ensure_bucket("raw")
    minio.store.put_bytes("raw", "law/a.txt", b"some text")
    return minio


def _config(minio: MinioFixture, cycle: str, uid: str = "uid-1", **overrides: Any) -> StageConfig:
    spec = _spec(storage=minio.storage.model_dump(by_alias=True), **overrides)
    return StageConfig(stack="recipe", cycle_id=cycle, stack_uid=uid, spec=spec)


def test_finished_stage_is_reused_only_on_an_exact_recipe_match(small_stages: MinioFixture) -> None:
    store = small_stages.store
    first = run_stage("clean", _config(small_stages, "r1"), store)
    assert first["recipe"]["stackUid"] == "uid-1" and first["recipe"]["inputs"] == {}
    # Same recipe, different execution fields: reused, the stage does not run again.
    operational = _config(small_stages, "r1", **{"pipeline.cleaning.sparkExecutors": 9, "inference.replicas": 3})
    assert run_stage("clean", operational, store) == first
    assert CALLS.count(("r1", "clean")) == 1
    # A recipe change, a re-created stack (other uid): refused in one line, nothing overwritten.
    for config, what in (
        (_config(small_stages, "r1", **{"pipeline.cleaning.minChars": 3}), "stage config"),
        (_config(small_stages, "r1", uid="uid-2"), "stack uid"),
    ):
        with pytest.raises(RecipeMismatch, match=what) as err:
            run_stage("clean", config, store)
        assert "\n" not in str(err.value) and "recipe/cycles/r1/clean/_manifest.json" in str(err.value)
    assert CALLS.count(("r1", "clean")) == 1
    # The same new recipe under a new cycle id runs.
    rerun = run_stage("clean", _config(small_stages, "r2", **{"pipeline.cleaning.minChars": 3}), store)
    assert rerun["recipe"]["hash"] != first["recipe"]["hash"]


def test_a_stage_records_its_inputs_and_refuses_reuse_after_they_changed(small_stages: MinioFixture) -> None:
    store = small_stages.store
    config = _config(small_stages, "r3")
    clean = run_stage("clean", config, store)
    quant = run_stage("quant", config, store)
    assert set(quant["recipe"]["inputs"]) == {"clean"} and quant["recipe"]["inputs"]["clean"]
    assert run_stage("quant", config, store) == quant
    # The input stage was rebuilt in place (by hand, or an older runner): its dependant is not reused.
    key = f"default/recipe/cycles/r3/clean/{MANIFEST}"
    store.put_bytes("artifacts", key, json.dumps({**clean, "finishedAt": "later"}).encode())
    with pytest.raises(RecipeMismatch, match="input manifests"):
        run_stage("quant", config, store)


def test_a_manifest_without_a_recipe_is_refused_in_one_line(small_stages: MinioFixture) -> None:
    store = small_stages.store
    store.ensure_bucket("artifacts")
    old = {"stage": "clean", "cycle": "r4", "outputs": [], "counts": {}, "metrics": {}, "versions": {}}
    store.put_bytes("artifacts", f"default/recipe/cycles/r4/clean/{MANIFEST}", json.dumps(old).encode())
    with pytest.raises(RecipeMismatch, match="older release"):
        run_stage("clean", _config(small_stages, "r4"), store)


def test_a_boosted_index_waits_for_quant_and_is_rebuilt_with_it() -> None:
    clean, quant = StageRun("clean"), StageRun("quant")
    plain, boosted = _spec(), _spec(**{"pipeline.rag.qualityBoost": 1.5})
    assert StageRun("index") in runnable(plain, {clean}, {clean, quant})
    assert StageRun("index") not in runnable(boosted, {clean}, {clean, quant}), "index read quant before it finished"
    assert StageRun("index") in runnable(boosted, {clean, quant}, {clean, quant})
    built = {r.id: BuiltRun(cycle="c1", recipe_hash=recipe_hash(plain, r.stage, r.expert)) for r in cycle_runs(plain)}
    built["quant"] = BuiltRun(cycle="c1", recipe_hash="another quant recipe")
    assert "index" in reusable_runs(plain, built), "an unboosted index does not read quant"
    boosted_built = {**built, "index": BuiltRun(cycle="c1", recipe_hash=recipe_hash(boosted, "index", None))}
    assert "index" not in reusable_runs(boosted, boosted_built), "a boosted index must follow a re-run quant"
