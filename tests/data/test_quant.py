"""The quant stage with Polars straight on MinIO: features, curation, insights, drift and bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from latentmas.jobs.quant import QuantInputError, ks, psi, scan
from latentmas.stage import MANIFEST, StageConfig, run_stage
from latentmas.testing.fixtures import MinioFixture

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
    insights = json.loads(minio.store.get_bytes("artifacts", stage_key("chain", "quant", "insights.json")))
    metrics = scan(storage, "artifacts", stage_key("chain", "clean", "metrics.parquet")).collect()
    full = scan(storage, "artifacts", stage_key("chain", "quant", "features_full.parquet")).collect()
    curated = scan(storage, "artifacts", stage_key("chain", "quant", "features.parquet")).collect()
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
    for cycle, action in (("drift-warn", "warn"), ("drift-fail", "fail")):
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
