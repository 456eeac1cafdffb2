"""The quant stage (Polars, lazy and streaming, straight on object storage): per-document metrics ->
polynomial features, curated by correlation, plus insights for synthesis and retrieval.

scout     schema and statistics from the parquet footer only (no data pages read);
validator schema checks, then PSI/KS drift of every metric against a reference (warn or fail);
features  polynomial interaction features built as lazy expressions and written by a streaming sink;
curator   correlation computed block by block of columns; features above the threshold dropped.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from latentmas.spec import QuantSpec, StorageSpec
from latentmas.stage import StageContext, StageResult
from latentmas.store import ACCESS_KEY_ENV, SECRET_KEY_ENV

REQUIRED = ("doc_id", "domain")
ID_COLUMNS = ["doc_id", "domain"]
FEATURES_FULL, FEATURES, QUALITY, INSIGHTS = (
    "features_full.parquet",
    "features.parquet",
    "quality.parquet",
    "insights.json",
)
NUMERIC = (pl.Float32, pl.Float64, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


class QuantInputError(RuntimeError):
    """Bad input for the quant stage; the message names the object and the problem."""


# ---- locations ------------------------------------------------------------------------------------------
def location(storage: StorageSpec, bucket: str, key: str) -> tuple[str, dict[str, str] | None]:
    """A Polars path plus storage options: s3:// on MinIO/S3, a plain path for the local file store."""
    if storage.endpoint.startswith("file://"):
        return os.path.join(storage.endpoint.removeprefix("file://"), bucket, key), None
    scheme = "https" if storage.secure else "http"
    options = {
        "aws_endpoint_url": f"{scheme}://{storage.endpoint}",
        "aws_access_key_id": os.environ.get(ACCESS_KEY_ENV, ""),
        "aws_secret_access_key": os.environ.get(SECRET_KEY_ENV, ""),
        "aws_region": storage.region,
        "aws_allow_http": str(not storage.secure).lower(),
    }
    return f"s3://{bucket}/{key}", options


def scan(storage: StorageSpec, bucket: str, key: str) -> pl.LazyFrame:
    uri, options = location(storage, bucket, key)
    return pl.scan_parquet(uri, storage_options=options)


def stream_to(frame: pl.LazyFrame, uri: str, options: dict[str, str] | None = None) -> None:
    """Streams `frame` into one parquet file/object. Morsels and row groups are sized to ~8 MB of
    float64 whatever the width, so peak memory stays bounded for hundreds of feature columns."""
    width = max(len(frame.collect_schema()), 1)
    rows = max(1_000, min(100_000, (8 << 20) // (8 * width)))
    with pl.Config(streaming_chunk_size=rows):
        frame.sink_parquet(uri, storage_options=options, row_group_size=4 * rows)


def sink(frame: pl.LazyFrame, storage: StorageSpec, bucket: str, key: str) -> None:
    uri, options = location(storage, bucket, key)
    if options is None:
        os.makedirs(os.path.dirname(uri), exist_ok=True)
    stream_to(frame, uri, options)


# ---- scout ----------------------------------------------------------------------------------------------
def scout(storage: StorageSpec, bucket: str, key: str) -> dict[str, Any]:
    """Rows, schema and per-column min/max/nulls from the parquet footer's row-group statistics."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if storage.endpoint.startswith("file://"):
        fs: Any = pafs.LocalFileSystem()
        path = os.path.join(storage.endpoint.removeprefix("file://"), bucket, key)
    else:
        fs = pafs.S3FileSystem(
            access_key=os.environ.get(ACCESS_KEY_ENV, ""),
            secret_key=os.environ.get(SECRET_KEY_ENV, ""),
            endpoint_override=storage.endpoint,
            scheme="https" if storage.secure else "http",
            region=storage.region,
        )
        path = f"{bucket}/{key}"
    try:
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QuantInputError(f"{bucket}/{key}: not a readable parquet file ({first})") from err
    schema = meta.schema.to_arrow_schema()
    columns: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(schema.names):
        stats = [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)]
        known = [s for s in stats if s is not None and s.has_min_max]
        columns[name] = {
            "type": str(schema.field(name).type),
            "nulls": sum(int(s.null_count) for s in stats if s is not None and s.has_null_count),
            "min": _plain(min(s.min for s in known)) if known and len(known) == len(stats) else None,
            "max": _plain(max(s.max for s in known)) if known and len(known) == len(stats) else None,
        }
    return {"object": f"{bucket}/{key}", "rows": meta.num_rows, "rowGroups": meta.num_row_groups, "columns": columns}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, int | float | str) else str(value)


# ---- validator ------------------------------------------------------------------------------------------
def metric_columns(schema: pl.Schema, where: str) -> list[str]:
    """Numeric metric columns; a one-line error when required columns are missing or none is numeric."""
    missing = [c for c in REQUIRED if c not in schema]
    if missing:
        raise QuantInputError(f"{where}: missing columns {', '.join(missing)}")
    numeric = [name for name, dtype in schema.items() if name not in REQUIRED and dtype in NUMERIC]
    if not numeric:
        raise QuantInputError(f"{where}: no numeric metric columns")
    return numeric


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (epsilon-smoothed)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:
        return 0.0 if np.allclose(current, reference[0]) else math.inf
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference) + 1e-6
    cur = np.histogram(current, edges)[0] / len(current) + 1e-6
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks(reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    points = np.sort(np.concatenate([reference, current]))
    ref = np.searchsorted(np.sort(reference), points, side="right") / len(reference)
    cur = np.searchsorted(np.sort(current), points, side="right") / len(current)
    return float(np.max(np.abs(ref - cur)))


def drift_report(
    reference: pl.LazyFrame, current: pl.LazyFrame, columns: Sequence[str], spec: QuantSpec
) -> dict[str, Any]:
    ref = reference.select(columns).collect()
    cur = current.select(columns).collect()
    report: dict[str, Any] = {}
    for name in columns:
        a, b = ref[name].drop_nulls().to_numpy().astype(float), cur[name].drop_nulls().to_numpy().astype(float)
        if len(a) == 0 or len(b) == 0:
            continue
        p, k = psi(a, b), ks(a, b)
        report[name] = {
            "psi": round(p, 4),
            "ks": round(k, 4),
            "drifted": p > spec.psi_threshold or k > spec.ks_threshold,
        }
    return report


# ---- features -------------------------------------------------------------------------------------------
def polynomial_names(columns: Sequence[str], degree: int) -> list[tuple[str, ...]]:
    """Every monomial of degree 1..`degree` over `columns` (with repeats), in a stable order."""
    return [combo for d in range(1, degree + 1) for combo in itertools.combinations_with_replacement(columns, d)]


def polynomial_exprs(columns: Sequence[str], degree: int) -> list[pl.Expr]:
    exprs = []
    for combo in polynomial_names(columns, degree):
        expr = pl.col(combo[0]).cast(pl.Float64)
        for name in combo[1:]:
            expr = expr * pl.col(name).cast(pl.Float64)
        exprs.append(expr.alias("*".join(combo)))
    return exprs


def feature_frame(metrics: pl.LazyFrame, columns: Sequence[str], degree: int) -> pl.LazyFrame:
    return metrics.select(pl.col(ID_COLUMNS), *polynomial_exprs(columns, degree))


# ---- curator --------------------------------------------------------------------------------------------
def block_correlation(frame: pl.LazyFrame, columns: Sequence[str], block: int) -> np.ndarray:
    """Pearson correlation matrix computed one pair of column blocks at a time (memory: two blocks)."""
    stats = frame.select([pl.col(c).mean().alias(f"m{i}") for i, c in enumerate(columns)]
                         + [pl.col(c).std(ddof=0).alias(f"s{i}") for i, c in enumerate(columns)]).collect()  # fmt: skip
    means = np.array([stats[f"m{i}"][0] for i in range(len(columns))], dtype=float)
    stds = np.array([stats[f"s{i}"][0] or 0.0 for i in range(len(columns))], dtype=float)
    blocks = [list(range(s, min(s + block, len(columns)))) for s in range(0, len(columns), block)]
    corr = np.eye(len(columns))

    def standardized(idx: list[int]) -> np.ndarray:
        values = frame.select([columns[i] for i in idx]).collect().to_numpy().astype(float)
        scale = np.where(stds[idx] > 0, stds[idx], 1.0)
        return np.nan_to_num((values - means[idx]) / scale)

    for bi, rows in enumerate(blocks):
        left = standardized(rows)
        n = max(len(left), 1)
        for cols in blocks[bi:]:
            right = left if cols == rows else standardized(cols)
            part = left.T @ right / n
            corr[np.ix_(rows, cols)] = part
            corr[np.ix_(cols, rows)] = part.T
    constant = stds == 0
    corr[constant, :] = 0.0
    corr[:, constant] = 0.0
    return np.clip(corr, -1.0, 1.0)


def curate(
    corr: np.ndarray, columns: Sequence[str], threshold: float, constant: set[str]
) -> tuple[list[str], dict[str, str]]:
    """Greedy: keep a feature unless it is constant or |corr| > threshold with an already kept one."""
    kept: list[int] = []
    dropped: dict[str, str] = {}
    for j, name in enumerate(columns):
        if name in constant:
            dropped[name] = "constant"
            continue
        match = next((i for i in kept if abs(corr[i, j]) > threshold), None)
        if match is None:
            kept.append(j)
        else:
            dropped[name] = f"|corr| {abs(corr[match, j]):.3f} with {columns[match]}"
    return [columns[i] for i in kept], dropped


def top_correlations(corr: np.ndarray, columns: Sequence[str], limit: int = 20) -> list[dict[str, Any]]:
    upper = [(abs(corr[i, j]), i, j) for i in range(len(columns)) for j in range(i + 1, len(columns))]
    upper.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"a": columns[i], "b": columns[j], "corr": round(float(corr[i, j]), 4)} for _, i, j in upper[:limit]]


def domain_separation(frame: pl.LazyFrame, columns: Sequence[str]) -> dict[str, float]:
    """ANOVA F statistic of each feature across domains: which features tell the experts apart."""
    groups = (
        frame.group_by("domain")
        .agg(
            pl.len().alias("__n"),
            *[pl.col(c).mean().alias(f"{c}__mean") for c in columns],
            *[pl.col(c).var(ddof=0).alias(f"{c}__var") for c in columns],
        )
        .collect()
    )
    n = groups["__n"].to_numpy().astype(float)
    total, k = float(n.sum()), len(n)
    scores: dict[str, float] = {}
    for c in columns:
        means, var = groups[f"{c}__mean"].to_numpy().astype(float), groups[f"{c}__var"].to_numpy().astype(float)
        grand = float(np.sum(n * means) / total)
        between = float(np.sum(n * (means - grand) ** 2)) / max(k - 1, 1)
        within = float(np.sum(n * var)) / max(total - k, 1)
        scores[c] = round(between / within, 4) if within > 0 else 0.0
    return scores


def quality_frame(metrics: pl.LazyFrame) -> pl.LazyFrame:
    """A [0, 1] per-document quality score (rank within the domain of lexical richness minus symbol noise),
    used by retrieval as an optional boost."""
    raw = pl.col("unique_word_ratio") + pl.col("stopword_ratio") - pl.col("symbol_ratio")
    rank = raw.rank("average").over("domain")
    count = pl.len().over("domain")
    return metrics.select("doc_id", "domain", ((rank - 1) / pl.max_horizontal(count - 1, 1)).alias("quality"))


# ---- the stage ------------------------------------------------------------------------------------------
def run(ctx: StageContext) -> StageResult:
    spec = ctx.spec.pipeline.quant
    storage = ctx.spec.storage
    clean = ctx.read_manifest("clean")
    metrics_key = ctx.prefix("clean") + "metrics.parquet"
    where = f"{ctx.bucket}/{metrics_key}"
    report = scout(storage, ctx.bucket, metrics_key)
    metrics = scan(storage, ctx.bucket, metrics_key)
    columns = metric_columns(metrics.collect_schema(), where)
    if report["rows"] == 0:
        raise QuantInputError(f"{where}: no rows to featurize")
    ctx.progress(1, 5, phase="scouted", rows=report["rows"], columns=len(columns))

    drift: dict[str, Any] = {"reference": spec.drift_reference, "columns": {}}
    if spec.drift_reference:
        ref_where = f"{ctx.bucket}/{spec.drift_reference}"
        scout(storage, ctx.bucket, spec.drift_reference)
        reference = scan(storage, ctx.bucket, spec.drift_reference)
        shared = [c for c in columns if c in metric_columns(reference.collect_schema(), ref_where)]
        drift["columns"] = drift_report(reference, metrics, shared, spec)
        drifted = sorted(c for c, r in drift["columns"].items() if r["drifted"])
        drift["drifted"] = drifted
        if drifted and spec.drift_action == "fail":
            raise QuantInputError(f"{where}: drift against {ref_where} in {len(drifted)} columns: {', '.join(drifted)}")
    ctx.progress(2, 5, phase="validated", drifted=len(drift.get("drifted", [])))

    clock = time.monotonic()
    full_key = ctx.key(FEATURES_FULL)
    sink(feature_frame(metrics, columns, spec.polynomial_degree), storage, ctx.bucket, full_key)
    features = scan(storage, ctx.bucket, full_key)
    names = ["*".join(combo) for combo in polynomial_names(columns, spec.polynomial_degree)]
    sink_seconds = time.monotonic() - clock
    ctx.progress(3, 5, phase="featurized", features=len(names))

    corr = block_correlation(features, names, spec.block_size)
    stds = features.select([pl.col(c).std(ddof=0) for c in names]).collect().row(0)
    constant = {c for c, s in zip(names, stds, strict=True) if not s}
    kept, dropped = curate(corr, names, spec.correlation_threshold, constant)
    sink(features.select(pl.col(ID_COLUMNS), *[pl.col(c) for c in kept]), storage, ctx.bucket, ctx.key(FEATURES))
    sink(quality_frame(metrics), storage, ctx.bucket, ctx.key(QUALITY))
    ctx.progress(4, 5, phase="curated", kept=len(kept), dropped=len(dropped))

    separation = domain_separation(features, kept)
    top = sorted(kept, key=lambda c: (-separation[c], c))[:15]
    insights = {
        "scout": report,
        "drift": drift,
        "features": {"degree": spec.polynomial_degree, "base": columns, "generated": len(names), "kept": kept},
        "dropped": dropped,
        "topFeatures": [{"name": c, "domainF": separation[c]} for c in top],
        "correlations": top_correlations(corr, names),
        "domains": {k.removeprefix("domain_"): v for k, v in clean["counts"].items() if k.startswith("domain_")},
    }
    ctx.put_json(INSIGHTS, insights)
    ctx.progress(5, 5, phase="done")
    counts = {"rows": int(report["rows"]), "baseColumns": len(columns), "generated": len(names), "kept": len(kept),
              "dropped": len(dropped), "drifted": len(drift.get("drifted", []))}  # fmt: skip
    return StageResult(
        outputs=[FEATURES_FULL, FEATURES, QUALITY, INSIGHTS],
        counts=counts,
        metrics={
            "inputs": {"metrics": where, "reference": spec.drift_reference},
            "sinkSeconds": round(sink_seconds, 3),
        },
        versions={"polars": pl.__version__},
    )
