"""The stage contract on both stores: manifest last, re-run is a no-op, errors name the object."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from latentmas.cycle import StageRun, cycle_runs, runnable
from latentmas.spec import LatentMASStackSpec, StorageSpec
from latentmas.stage import MANIFEST, STAGES, StageConfig, StageContext, StageResult, run_stage
from latentmas.store import LocalStore, ObjectNotFound, ObjectStore, StoreError, open_store, sha256_object
from latentmas.testing.fixtures import MinioFixture

pytestmark = pytest.mark.harness
CALLS: list[str] = []


def word_count_stage(ctx: StageContext) -> StageResult:
    """A real (small) stage: counts words of every raw object."""
    CALLS.append(ctx.config.cycle_id)
    counts = {o.key: len(ctx.store.get_bytes(ctx.raw_bucket, o.key).split()) for o in ctx.store.list(ctx.raw_bucket)}
    ctx.put_json("counts.json", counts)
    return StageResult(outputs=["counts.json"], counts={"documents": len(counts)})


def config(storage: StorageSpec, cycle: str) -> StageConfig:
    spec = LatentMASStackSpec.model_validate(
        {"storage": storage.model_dump(), "experts": [{"name": "a", "domain": "a"}]}
    )
    return StageConfig(stack="demo", cycle_id=cycle, spec=spec)


def check_contract(store: ObjectStore, storage: StorageSpec, cycle: str) -> None:
    STAGES["wordcount"] = f"{__name__}:word_count_stage"
    store.ensure_bucket("raw")
    store.put_bytes("raw", f"{cycle}/a.txt", b"one two three")
    first = run_stage("wordcount", config(storage, cycle), store)
    assert first["counts"]["documents"] >= 1
    out = first["outputs"][0]
    key = f"default/demo/cycles/{cycle}/wordcount/"
    stored = store.get_bytes("artifacts", key + "counts.json")
    assert out == {"key": "counts.json", "size": len(stored), "sha256": hashlib.sha256(stored).hexdigest()}
    assert sha256_object(store, "artifacts", key + "counts.json", block=5) == (out["size"], out["sha256"])
    assert json.loads(store.get_bytes("artifacts", key + "counts.json"))[f"{cycle}/a.txt"] == 3
    assert json.loads(store.get_bytes("artifacts", key + MANIFEST))["stage"] == "wordcount"
    calls = CALLS.count(cycle)
    assert run_stage("wordcount", config(storage, cycle), store) == first
    assert CALLS.count(cycle) == calls, "a finished stage ran again"


def test_stage_contract_on_local_store(tmp_path: Path) -> None:
    storage = StorageSpec(endpoint=f"file://{tmp_path}")
    check_contract(open_store(storage), storage, "c1")


def test_stage_contract_on_minio(minio: MinioFixture) -> None:
    check_contract(open_store(minio.storage), minio.storage, "c2")


def test_local_store_rejects_escaping_keys_and_reports_missing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.ensure_bucket("b")
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes("b", "../outside", b"x")
    with pytest.raises(ObjectNotFound, match="b/nope"):
        store.get_bytes("b", "nope")
    with pytest.raises(ObjectNotFound, match="bucket 'zz'"):
        list(store.list("zz"))


def test_unreachable_endpoint_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTMAS_S3_ACCESS_KEY", "x")
    monkeypatch.setenv("LATENTMAS_S3_SECRET_KEY", "y")
    store = open_store(StorageSpec(endpoint="127.0.0.1:1"))
    with pytest.raises(StoreError, match="unreachable"):
        store.get_bytes("raw", "a")


def test_cycle_order_runs_experts_in_parallel() -> None:
    spec = LatentMASStackSpec.model_validate(
        {"experts": [{"name": "math", "domain": "math"}, {"name": "code", "domain": "code"}]}
    )
    runs = cycle_runs(spec)
    assert [r.id for r in runs][-5:] == ["train-math", "train-code", "router", "evaluate", "promote"]
    assert runnable(spec, [], []) == [StageRun("clean")]
    after_clean = {r.stage for r in runnable(spec, [StageRun("clean")], [])}
    assert after_clean == {"quant", "index", "base"}
    done = [r for r in runs if r.stage in {"clean", "quant", "synth", "index", "base"}]
    assert {r.id for r in runnable(spec, done, [])} == {"train-math", "train-code", "router"}
    assert runnable(spec, [*done, StageRun("train", "math"), StageRun("router")], [StageRun("train", "code")]) == []
