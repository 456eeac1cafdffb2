"""The skip-an-expert contract on real stages and MinIO: a domain with no cleaned documents and one
with a single document (too few for a held-out split) are skipped, not failed. Their train runs and
the router run (fewer than two experts left) write manifests with `skipped: true` and the reason;
evaluate and promote proceed with the expert that has data; the skipped expert's promoted version
and the promoted router stay."""

from __future__ import annotations

import random

import pytest
from latentmas.stage import StageConfig
from latentmas.testing.fixtures import MinioFixture

from tests.training.conftest import EXPERTS, Cycle, new_cycle, stack_spec
from tests.training.sampledata import documents

STACK = "skips"
RAW = "skips-raw/"


@pytest.fixture(scope="module")
def first(minio: MinioFixture, model_cache: str) -> Cycle:
    """A first cycle in which both experts and the router were promoted."""
    return new_cycle(minio, STACK, "s1", stack_spec(minio, EXPERTS)).run_all()


def upload_raw(minio: MinioFixture) -> None:
    """finance: 30 documents; medicine: one; legal (the new `law` expert's domain): none."""
    rng = random.Random(11)
    for i, text in enumerate(documents("finance", rng)[:30]):
        minio.store.put_bytes("raw", f"{RAW}finance/doc{i:02d}.txt", text.encode())
    minio.store.put_bytes("raw", f"{RAW}medicine/only.txt", documents("medicine", rng)[0].encode())


def test_experts_without_data_are_skipped_and_keep_their_versions(first: Cycle, minio: MinioFixture) -> None:
    before = first.registry()
    assert before.experts["med"].current == 1 and before.router.current == 1
    upload_raw(minio)
    spec = stack_spec(minio, [*EXPERTS, {"name": "law", "domain": "legal"}])
    spec.pipeline.cleaning.raw_prefix = RAW
    cycle = Cycle(minio.store, StageConfig(stack=STACK, cycle_id="s2", spec=spec))
    for stage in ("clean", "quant"):
        cycle.run(stage)
    synth = cycle.run("synth")
    assert synth["skipped"] is False
    assert synth["metrics"]["skippedDomains"] == {
        "legal": "domain 'legal' has no cleaned documents",
        "medicine": "domain 'medicine' has 1 document(s): too few for a held-out split",
    }
    assert synth["counts"]["finance_train"] > 0 and synth["counts"]["finance_heldout"] > 0

    cycle.run_all()
    for name, domain in (("med", "medicine"), ("law", "legal")):
        manifest = cycle.manifests[f"train-{name}"]
        assert manifest["skipped"] is True and manifest["outputs"] == []
        assert manifest["skipReason"].startswith(f"expert {name!r} skipped: domain {domain!r}")
    assert cycle.manifests["train-fin"]["skipped"] is False
    router = cycle.manifests["router"]
    assert router["skipped"] is True
    assert router["skipReason"] == "router needs at least 2 experts with data this cycle; have 1 (fin)"

    evaluation = cycle.read_json("evaluate", "evaluation.json")
    assert set(evaluation["experts"]) == {"fin", "med", "law"}
    assert evaluation["experts"]["med"]["skipped"] is True and evaluation["experts"]["law"]["skipped"] is True
    assert evaluation["experts"]["fin"]["expert"]["loss"] > 0 and evaluation["experts"]["fin"]["served"] is None
    assert evaluation["router"]["skipped"] is True

    promotion = cycle.read_json("promote", "promotion.json")
    for name in ("med", "law", "router"):
        assert promotion["decisions"][name]["skipped"] is True and promotion["decisions"][name]["promoted"] is False
    assert cycle.manifests["promote"]["metrics"]["skipped"] == ["law", "med", "router"]
    assert "fin" not in cycle.manifests["promote"]["metrics"]["skipped"]

    after = cycle.registry()
    assert after.revision == before.revision + 1
    assert after.experts["med"].current == before.experts["med"].current == 1
    assert after.router.current == before.router.current
    assert "law" not in after.experts or after.experts["law"].current is None
    assert not any(r["name"] in ("med", "law") for r in after.rejected if r.get("cycle") == "s2")
