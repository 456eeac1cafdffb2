"""The quant stage with Polars straight on MinIO: features, curation, insights, drift and bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from latentmas.jobs.quant import Moments, QuantInputError, ks, psi, scan
from latentmas.registry import ArtifactEntry, ArtifactVersion, Registry, save_registry
from latentmas.stage import MANIFEST, StageConfig, run_stage
from latentmas.testing.fixtures import MinioFixture

from bench.data import run_quant_stage
from tests.data.conftest import stage_config, stage_key, written

pytestmark = pytest.mark.data


@pytest.fixture(scope="session")
def quanted(minio: MinioFixture, cleaned: StageConfig) -> StageConfig:
    run_stage("quant", cleaned, minio.store)
    return cleaned


def copy_clean(minio: MinioFixture, cycle: str, metrics: bytes | None = None) -> None:
    """Gives `cycle` a finished clean stage (the chain's, or one with the given metrics object)."""
    for name in ("metrics.parquet", MANIFEST):
        data = minio.store.get_bytes("artifacts", stage_key("chain", "clean", name))
        if name == "metrics.parquet" and metrics is not None:
            data = metrics
        minio.store.put_bytes("artifacts", stage_key(cycle, "clean", name), data)


def test_quant_features_curated_below_threshold(minio: MinioFixture, quanted: StageConfig) -> None:
    storage = quanted.spec.storage
    chain = json.loads(minio.store.get_bytes("artifacts", stage_key("chain", "quant", MANIFEST)))
    assert [o["key"] for o in chain["outputs"]] == ["quality.parquet", "insights.json"], "features are opt-in"
    copy_clean(minio, "features")
    run_stage("quant", stage_config(minio.storage, "features", {"quant": {"writeFeatures": True}}), minio.store)
    insights = json.loads(minio.store.get_bytes("artifacts", stage_key("features", "quant", "insights.json")))
    metrics = scan(storage, "artifacts", stage_key("chain", "clean", "metrics.parquet")).collect()
    full = scan(storage, "artifacts", stage_key("features", "quant", "features_full.parquet")).collect()
    curated = scan(storage, "artifacts", stage_key("features", "quant", "features.parquet")).collect()
    base = insights["features"]["base"]
    assert len(base) == 17 and insights["features"]["generated"] == 17 + 17 * 18 // 2 == full.width - 2
    assert full.height == curated.height == metrics.height == insights["scout"]["rows"]
    assert np.allclose(full["chars*words"].to_numpy(), (metrics["chars"] * metrics["words"]).to_numpy())
    kept = insights["features"]["kept"]
    assert curated.columns == ["doc_id", "domain", *kept] and 0 < len(kept) < insights["features"]["generated"]
    corr = np.corrcoef(curated.select(kept).to_numpy().T)
    off_diagonal = np.abs(corr[~np.eye(len(kept), dtype=bool)])
    assert off_diagonal.max() <= 0.95 + 1e-9, "curated features still contain a redundant pair"
    assert insights["scout"]["columns"]["chars"]["min"] == metrics["chars"].min()
    assert insights["topFeatures"] and insights["drift"]["reference"] is None
    quality = scan(storage, "artifacts", stage_key("chain", "quant", "quality.parquet")).collect()
    assert quality["quality"].min() >= 0.0 and quality["quality"].max() <= 1.0
    # The batch-wise ranking equals Polars' in-memory average rank within the domain.
    raw = pl.col("unique_word_ratio") + pl.col("stopword_ratio") - pl.col("symbol_ratio")
    expected = metrics.select(
        "doc_id", ((raw.rank("average").over("domain") - 1) / pl.max_horizontal(pl.len().over("domain") - 1, 1))
    )
    assert quality["doc_id"].to_list() == expected["doc_id"].to_list()
    assert np.allclose(quality["quality"].to_numpy(), expected.to_series(1).to_numpy())


def test_streaming_moments_equal_the_in_memory_statistics() -> None:
    """Batches of uneven sizes, shifted and scaled columns, a constant one: the merged moments give
    numpy's correlation matrix and per-domain variances."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=(5000, 6)) * [1, 10, 1e-3, 1, 5, 1] + [0, 1e6, 3, -7, 0, 0]
    values[:, 3] = 2.5  # constant
    values[:, 4] = 0.9 * values[:, 0] + 0.1 * values[:, 4]
    domains = rng.choice(np.array(["a", "b", "c"]), size=len(values))
    moments = Moments(values.shape[1])
    for start, stop in ((0, 7), (7, 2000), (2000, 2001), (2001, 5000)):
        moments.add(values[start:stop], domains[start:stop])
    varying = [0, 1, 2, 4, 5]
    assert moments.constant().tolist() == [False, False, False, True, False, False]
    assert np.allclose(moments.correlation()[np.ix_(varying, varying)], np.corrcoef(values[:, varying].T), atol=1e-9)
    assert not moments.correlation()[3].any()
    for domain in ("a", "b", "c"):
        n, mean, m2 = moments.domains[domain]
        rows = values[domains == domain]
        assert n == len(rows) and np.allclose(mean, rows.mean(axis=0)) and np.allclose(m2 / n, rows.var(axis=0))


def test_whole_stage_memory_is_bounded() -> None:
    """The whole stage on 200k rows x 20 columns at degree 2 (230 features) in a fresh process: the
    in-memory stage it replaced peaked at 870 MB on 250k rows; the streaming one stays near the
    interpreter's own footprint (bench.data measures 1M rows: docs/data.md)."""
    result = run_quant_stage(200_000, 20, 2)
    assert result["generated"] == 230 and result["kept"] > 0
    assert result["peakRssMB"] <= 400, result
    assert result["peakRssMB"] - result["rssBeforeStageMB"] <= 200, result


def test_psi_and_ks_detect_shift() -> None:
    rng = np.random.default_rng(0)
    base, same, shifted = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), rng.normal(1.5, 1, 2000)
    assert psi(base, same) < 0.1 and ks(base, same) < 0.1
    assert psi(base, shifted) > 0.5 and ks(base, shifted) > 0.4


def test_drift_warns_or_fails_by_config(minio: MinioFixture, quanted: StageConfig) -> None:
    metrics = scan(quanted.spec.storage, "artifacts", stage_key("chain", "clean", "metrics.parquet")).collect()
    shifted = metrics.with_columns(pl.col("chars") * 10, pl.col("words") * 10)
    buffer = io.BytesIO()
    shifted.write_parquet(buffer)
    minio.store.put_bytes("artifacts", "refs/shifted-metrics.parquet", buffer.getvalue())
    for cycle, action in (("drift-warn", "warn"), ("drift-fail", "fail")):  # an explicit reference
        copy_clean(minio, cycle)
        quant = {"driftReference": "refs/shifted-metrics.parquet", "driftAction": action}
        config = stage_config(minio.storage, cycle, {"quant": quant})
        if action == "warn":
            manifest = run_stage("quant", config, minio.store)
            insights = json.loads(minio.store.get_bytes("artifacts", stage_key(cycle, "quant", "insights.json")))
            assert {"chars", "words"} <= set(insights["drift"]["drifted"]) and manifest["counts"]["drifted"] >= 2
            assert not insights["drift"]["columns"]["stopword_ratio"]["drifted"]
        else:
            with pytest.raises(QuantInputError, match=r"drift against artifacts/refs/shifted-metrics.parquet .*chars"):
                run_stage("quant", config, minio.store)
            assert not written(minio.store, cycle, "quant")


def test_drift_reference_defaults_to_the_last_promoted_cycle(minio: MinioFixture, quanted: StageConfig) -> None:
    """No driftReference: the clean metrics of the cycle behind the newest promoted version are the
    reference (none before the first promotion)."""
    metrics = scan(quanted.spec.storage, "artifacts", stage_key("chain", "clean", "metrics.parquet")).collect()
    shifted = io.BytesIO()
    metrics.with_columns(pl.col("chars") * 10).write_parquet(shifted)
    stack = "drift-default"

    def config(cycle: str) -> StageConfig:
        return stage_config(minio.storage, cycle).model_copy(update={"stack": stack})

    def give_clean(cycle: str, data: bytes | None = None) -> None:
        for name in ("metrics.parquet", MANIFEST):
            source = minio.store.get_bytes("artifacts", stage_key("chain", "clean", name))
            key = f"default/{stack}/cycles/{cycle}/clean/{name}"
            minio.store.put_bytes("artifacts", key, data if data is not None and name != MANIFEST else source)

    give_clean("first")
    first = run_stage("quant", config("first"), minio.store)
    assert first["metrics"]["inputs"]["reference"] is None
    give_clean("old", shifted.getvalue())
    promoted = ArtifactVersion(version=1, prefix=f"default/{stack}/registry/index/index/v1/", files={}, cycle="old")
    registry = Registry(index=ArtifactEntry(current=1, history=[promoted]))
    save_registry(minio.store, "artifacts", "default", stack, registry)
    give_clean("next")
    run_stage("quant", config("next"), minio.store)
    insights = json.loads(minio.store.get_bytes("artifacts", f"default/{stack}/cycles/next/quant/insights.json"))
    assert insights["drift"]["reference"] == f"default/{stack}/cycles/old/clean/metrics.parquet"
    assert insights["drift"]["source"] == "cycle old" and "chars" in insights["drift"]["drifted"]
    assert not insights["drift"]["columns"]["words"]["drifted"]


def test_bad_metrics_objects_are_one_line_errors(minio: MinioFixture, cleaned: StageConfig) -> None:
    frame = pl.DataFrame({"domain": ["a", "b"], "chars": [1.0, 2.0]})
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    cases = {
        "bad-columns": (buffer.getvalue(), "missing columns doc_id"),
        "bad-parquet": (b"not parquet", "not a readable parquet file"),
    }
    for cycle, (data, message) in cases.items():
        copy_clean(minio, cycle, data)
        with pytest.raises(QuantInputError, match=message) as err:
            run_stage("quant", stage_config(minio.storage, cycle), minio.store)
        assert stage_key(cycle, "clean", "metrics.parquet") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RuntimeError, match="stage 'clean' has not finished"):
        run_stage("quant", stage_config(minio.storage, "no-clean"), minio.store)
