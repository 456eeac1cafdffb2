"""The quant stage (Polars, lazy and streaming, straight on object storage): per-document metrics ->
polynomial features, curated by correlation, plus insights for synthesis and retrieval.

scout     schema and statistics from the parquet footers only (no data pages read);
validator schema checks, then PSI/KS drift of every metric against a reference (warn or fail): the
          spec's object, else the clean metrics of the cycle that made the last promoted version;
features  polynomial interaction features built as lazy expressions and written by a streaming sink;
curator   correlation and per-domain separation from one pass over the features in record batches
          (`Moments`); features above the correlation threshold dropped;
quality   a per-document score ranked within its domain, written batch by batch.

Memory is bounded by a record batch (~8 MB) plus, for drift and the ranking, one float64 column at a
time: the correlation matrix is a sum of outer products, which Polars' streaming engine cannot
express but a numpy accumulator over pyarrow batches computes exactly in one pass (DuckDB, the other
candidate, is not a dependency and would add nothing this accumulator lacks).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from latentmas.jobs.outputs import part_keys, read_parquet
from latentmas.registry import load_registry
from latentmas.spec import QuantSpec, StorageSpec
from latentmas.stage import StageContext, StageResult, stage_prefix
from latentmas.store import ACCESS_KEY_ENV, SECRET_KEY_ENV

REQUIRED = ("doc_id", "domain")
ID_COLUMNS = ["doc_id", "domain"]
METRICS_INPUT = "metrics.parquet"  # the clean stage's per-document metrics (one object or a folder of parts)
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


def scan(storage: StorageSpec, bucket: str, key: str | Sequence[str]) -> pl.LazyFrame:
    """A lazy scan of one parquet object or of several parts read as one table."""
    keys = [key] if isinstance(key, str) else list(key)
    located = [location(storage, bucket, k) for k in keys]
    return pl.scan_parquet([uri for uri, _ in located], storage_options=located[0][1])


def arrow_path(storage: StorageSpec, bucket: str, key: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for an object (S3/MinIO, or the local file store)."""
    import pyarrow.fs as pafs

    if storage.endpoint.startswith("file://"):
        return pafs.LocalFileSystem(), os.path.join(storage.endpoint.removeprefix("file://"), bucket, key)
    fs = pafs.S3FileSystem(
        access_key=os.environ.get(ACCESS_KEY_ENV, ""),
        secret_key=os.environ.get(SECRET_KEY_ENV, ""),
        endpoint_override=storage.endpoint,
        scheme="https" if storage.secure else "http",
        region=storage.region,
    )
    return fs, f"{bucket}/{key}"


def batches(
    storage: StorageSpec, bucket: str, keys: Sequence[str], columns: Sequence[str], rows: int
) -> Iterator[pa.RecordBatch]:
    """`columns` of parquet objects in record batches of at most `rows`, one row group read at a time."""
    for key in keys:
        fs, path = arrow_path(storage, bucket, key)
        with fs.open_input_file(path) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=rows, columns=list(columns))


def batch_rows(width: int) -> int:
    """Rows per batch so that `width` float64 columns take about 8 MB."""
    return max(1_000, min(100_000, (8 << 20) // (8 * max(width, 1))))


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
def scout(storage: StorageSpec, bucket: str, keys: Sequence[str], name: str) -> dict[str, Any]:
    """Rows, schema and per-column min/max/nulls from the parquet footers' row-group statistics (all parts)."""
    metas = []
    for key in keys:
        fs, path = arrow_path(storage, bucket, key)
        try:
            with fs.open_input_file(path) as handle:
                metas.append(pq.ParquetFile(handle).metadata)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise QuantInputError(f"{bucket}/{key}: not a readable parquet file ({first})") from err
    schema = metas[0].schema.to_arrow_schema()
    columns: dict[str, dict[str, Any]] = {}
    for index, column in enumerate(schema.names):
        stats = [m.row_group(g).column(index).statistics for m in metas for g in range(m.num_row_groups)]
        known = [s for s in stats if s is not None and s.has_min_max]
        complete = bool(known) and len(known) == len(stats)
        columns[column] = {
            "type": str(schema.field(column).type),
            "nulls": sum(int(s.null_count) for s in stats if s is not None and s.has_null_count),
            "min": _plain(min(s.min for s in known)) if complete else None,
            "max": _plain(max(s.max for s in known)) if complete else None,
        }
    rows = sum(m.num_rows for m in metas)
    groups = sum(m.num_row_groups for m in metas)
    return {"object": f"{bucket}/{name}", "rows": rows, "rowGroups": groups, "columns": columns}


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
    """PSI and KS per column, reading one column of each side at a time (memory: two float64 columns)."""
    report: dict[str, Any] = {}
    for name in columns:
        a = reference.select(pl.col(name).drop_nulls().cast(pl.Float64)).collect(engine="streaming")[name].to_numpy()
        b = current.select(pl.col(name).drop_nulls().cast(pl.Float64)).collect(engine="streaming")[name].to_numpy()
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
class Moments:
    """One streaming pass over feature rows: the count, means and co-moment matrix, overall and the
    diagonal per domain, merged batch by batch (Chan et al.'s pairwise update: stable, exact up to
    rounding, memory O(features^2) whatever the number of rows)."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.mean = np.zeros(width)
        self.comoment = np.zeros((width, width))
        self.domains: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}

    def add(self, values: np.ndarray, domains: np.ndarray) -> None:
        if len(values) == 0:
            return
        self.n, self.mean, self.comoment = merge(self.n, self.mean, self.comoment, values, outer=True)
        for domain in np.unique(domains):
            n, mean, m2 = self.domains.get(str(domain), (0, np.zeros_like(self.mean), np.zeros_like(self.mean)))
            self.domains[str(domain)] = merge(n, mean, m2, values[domains == domain], outer=False)

    def stds(self) -> np.ndarray:
        return np.sqrt(np.maximum(np.diag(self.comoment), 0.0) / max(self.n, 1))

    def constant(self) -> np.ndarray:
        """Columns with no spread (relative to their magnitude, so rounding in the means is not spread)."""
        return self.stds() <= 1e-12 * np.maximum(np.abs(self.mean), 1.0)

    def correlation(self) -> np.ndarray:
        stds = np.where(self.constant(), 1.0, self.stds())
        corr = self.comoment / max(self.n, 1) / np.outer(stds, stds)
        np.fill_diagonal(corr, 1.0)
        constant = self.constant()
        corr[constant, :] = 0.0
        corr[:, constant] = 0.0
        return np.clip(corr, -1.0, 1.0)

    def domain_separation(self, names: Sequence[str], columns: Sequence[str]) -> dict[str, float]:
        """ANOVA F statistic of each of `columns` across domains: which features tell the experts apart."""
        index = [list(names).index(c) for c in columns]
        stats = list(self.domains.values())
        n = np.array([s[0] for s in stats], dtype=float)
        means = np.array([s[1][index] for s in stats])
        var = np.array([s[2][index] for s in stats]) / n[:, None]
        total, k = float(n.sum()), len(n)
        grand = (n[:, None] * means).sum(axis=0) / total
        between = (n[:, None] * (means - grand) ** 2).sum(axis=0) / max(k - 1, 1)
        within = (n[:, None] * var).sum(axis=0) / max(total - k, 1)
        return {c: round(float(b / w), 4) if w > 0 else 0.0 for c, b, w in zip(columns, between, within, strict=True)}


def merge(
    n: int, mean: np.ndarray, moment: np.ndarray, values: np.ndarray, outer: bool
) -> tuple[int, np.ndarray, np.ndarray]:
    """Folds a batch into (count, mean, co-moment matrix or squared-deviation sums)."""
    m = len(values)
    batch_mean = values.mean(axis=0)
    centered = values - batch_mean
    batch_moment = centered.T @ centered if outer else (centered**2).sum(axis=0)
    total = n + m
    delta = batch_mean - mean
    correction = np.outer(delta, delta) if outer else delta**2
    return total, mean + delta * (m / total), moment + batch_moment + correction * (n * m / total)


def feature_moments(
    storage: StorageSpec, bucket: str, keys: Sequence[str], columns: Sequence[str], degree: int
) -> Moments:
    """The polynomial features' moments, computed from the metrics in record batches (the features
    are built per batch in numpy, the same products as `polynomial_exprs`, and never stored)."""
    combos = polynomial_names(columns, degree)
    moments = Moments(len(combos))
    for batch in batches(storage, bucket, keys, ["domain", *columns], batch_rows(len(combos))):
        base = {c: batch.column(c).to_numpy(zero_copy_only=False).astype(float) for c in columns}
        values = np.empty((batch.num_rows, len(combos)))
        for j, combo in enumerate(combos):
            product = base[combo[0]]
            for name in combo[1:]:
                product = product * base[name]
            values[:, j] = product
        moments.add(np.nan_to_num(values), batch.column("domain").to_numpy(zero_copy_only=False))
    return moments


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


def read_quality(ctx: StageContext) -> dict[str, float]:
    """doc_id -> quality score written by this cycle's quant stage (a clear error if it has not finished).
    Built from the two columns, not per-row dicts: at 1M documents that peaks at ~0.33 GB instead of ~0.6."""
    ctx.read_manifest("quant")
    table = read_parquet(ctx.store, ctx.bucket, ctx.prefix("quant") + QUALITY, ["doc_id", "quality"])
    return dict(zip(table.column("doc_id").to_pylist(), table.column("quality").to_pylist(), strict=True))


QUALITY_SCHEMA = pa.schema([("doc_id", pa.string()), ("domain", pa.string()), ("quality", pa.float64())])
QUALITY_INPUTS = ["unique_word_ratio", "stopword_ratio", "symbol_ratio"]


# Lexical richness minus symbol noise, before ranking.
RAW_QUALITY = (pl.col("unique_word_ratio") + pl.col("stopword_ratio") - pl.col("symbol_ratio")).alias("raw")


def average_rank_quality(sorted_raw: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """(average rank - 1) / (n - 1) of `raw` among a domain's sorted scores: ties share their mean rank."""
    below = np.searchsorted(sorted_raw, raw, side="left")
    through = np.searchsorted(sorted_raw, raw, side="right")
    rank = (below + through + 1) / 2.0
    return np.asarray((rank - 1) / max(len(sorted_raw) - 1, 1), dtype=float)


def raw_quality(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(domains, raw quality scores) of one record batch."""
    frame = pl.DataFrame(pl.from_arrow(batch)).select("domain", RAW_QUALITY)
    return frame["domain"].to_numpy(), frame["raw"].to_numpy().astype(float)


def domain_scores(storage: StorageSpec, bucket: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Each domain's raw scores, sorted, gathered batch by batch: 8 bytes a row and nothing else kept
    (a Polars group_by with a sorted-list aggregation materialised the input columns: 1 GB at 10M rows)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches(storage, bucket, keys, ["domain", *QUALITY_INPUTS], 100_000):
        domains, raw = raw_quality(batch)
        for domain in np.unique(domains):
            parts.setdefault(str(domain), []).append(raw[domains == domain])
    ranked = {}
    while parts:
        domain, chunks = parts.popitem()  # one domain's chunks freed as its sorted copy is made
        ranked[domain] = np.sort(np.concatenate(chunks))
    return ranked


def write_quality(storage: StorageSpec, bucket: str, keys: Sequence[str], target: str) -> None:
    """A [0, 1] per-document quality score, its rank within the domain, used by synthesis (minQuality)
    and retrieval (qualityBoost). The sorted scores are gathered first (`domain_scores`); the documents
    are then scored and written batch by batch."""
    ranked = domain_scores(storage, bucket, keys)
    fs, path = arrow_path(storage, bucket, target)
    if storage.endpoint.startswith("file://"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as out, pq.ParquetWriter(out, QUALITY_SCHEMA) as writer:
        for batch in batches(storage, bucket, keys, ["doc_id", "domain", *QUALITY_INPUTS], 100_000):
            domains, raw = raw_quality(batch)
            quality = np.zeros(len(raw))
            for domain in np.unique(domains):
                rows = domains == domain
                quality[rows] = average_rank_quality(ranked[str(domain)], raw[rows])
            table = pa.table({"doc_id": batch.column("doc_id"), "domain": batch.column("domain"), "quality": quality})
            writer.write_table(table.cast(QUALITY_SCHEMA))


# ---- the stage ------------------------------------------------------------------------------------------
def drift_reference(ctx: StageContext) -> tuple[str, str] | None:
    """(reference metrics key, where it came from): the spec's object, else the clean metrics of the
    cycle behind the most recently promoted version; None before anything was promoted."""
    spec = ctx.spec.pipeline.quant
    if spec.drift_reference:
        return spec.drift_reference, "spec"
    registry = load_registry(ctx.store, ctx.bucket, ctx.config.namespace, ctx.config.stack)
    entries = [registry.index, registry.router, *registry.experts.values()]
    promoted = [v for v in (e.active() for e in entries) if v is not None and v.cycle]
    if not promoted:
        return None
    cycle = max(promoted, key=lambda v: v.promoted_at).cycle
    if cycle == ctx.config.cycle_id:
        return None
    return stage_prefix(ctx.config.namespace, ctx.config.stack, cycle, "clean") + METRICS_INPUT, f"cycle {cycle}"


def check_drift(ctx: StageContext, metrics: pl.LazyFrame, columns: Sequence[str], where: str) -> dict[str, Any]:
    """The drift section of the insights; raises when the spec says drift fails the stage."""
    spec = ctx.spec.pipeline.quant
    found = drift_reference(ctx)
    if found is None:
        return {"reference": None, "columns": {}}
    key, source = found
    ref_where = f"{ctx.bucket}/{key}"
    try:
        ref_keys = part_keys(ctx.store, ctx.bucket, key)
    except FileNotFoundError as err:
        if source == "spec":
            raise QuantInputError(f"pipeline.quant.driftReference: {err}") from err
        return {"reference": key, "source": source, "columns": {}, "missing": True}
    scout(ctx.spec.storage, ctx.bucket, ref_keys, key)
    reference = scan(ctx.spec.storage, ctx.bucket, ref_keys)
    shared = [c for c in columns if c in metric_columns(reference.collect_schema(), ref_where)]
    report = drift_report(reference, metrics, shared, spec)
    drifted = sorted(c for c, r in report.items() if r["drifted"])
    if drifted and spec.drift_action == "fail":
        raise QuantInputError(f"{where}: drift against {ref_where} in {len(drifted)} columns: {', '.join(drifted)}")
    return {"reference": key, "source": source, "columns": report, "drifted": drifted}


def run(ctx: StageContext) -> StageResult:
    spec = ctx.spec.pipeline.quant
    storage = ctx.spec.storage
    clean = ctx.read_manifest("clean")
    metrics_key = ctx.prefix("clean") + METRICS_INPUT
    where = f"{ctx.bucket}/{metrics_key}"
    keys = part_keys(ctx.store, ctx.bucket, metrics_key)
    if not keys:
        raise QuantInputError(f"{where}: no rows to featurize")
    report = scout(storage, ctx.bucket, keys, metrics_key)
    metrics = scan(storage, ctx.bucket, keys)
    columns = metric_columns(metrics.collect_schema(), where)
    if report["rows"] == 0:
        raise QuantInputError(f"{where}: no rows to featurize")
    ctx.progress(1, 5, phase="scouted", rows=report["rows"], columns=len(columns))

    drift = check_drift(ctx, metrics, columns, where)
    ctx.progress(2, 5, phase="validated", drifted=len(drift.get("drifted", [])))

    clock = time.monotonic()
    names = ["*".join(combo) for combo in polynomial_names(columns, spec.polynomial_degree)]
    moments = feature_moments(storage, ctx.bucket, keys, columns, spec.polynomial_degree)
    corr = moments.correlation()
    constant = {c for c, flat in zip(names, moments.constant(), strict=True) if flat}
    kept, dropped = curate(corr, names, spec.correlation_threshold, constant)
    moment_seconds = time.monotonic() - clock
    ctx.progress(3, 5, phase="curated", features=len(names), kept=len(kept), dropped=len(dropped))

    outputs = [QUALITY, INSIGHTS]
    write_quality(storage, ctx.bucket, keys, ctx.key(QUALITY))
    if spec.write_features:
        features = feature_frame(metrics, columns, spec.polynomial_degree)
        sink(features, storage, ctx.bucket, ctx.key(FEATURES_FULL))
        sink(features.select(pl.col(ID_COLUMNS), *[pl.col(c) for c in kept]), storage, ctx.bucket, ctx.key(FEATURES))
        outputs = [FEATURES_FULL, FEATURES, *outputs]
    ctx.progress(4, 5, phase="written", outputs=len(outputs))

    separation = moments.domain_separation(names, kept)
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
        outputs=outputs,
        counts=counts,
        metrics={
            "inputs": {"metrics": where, "reference": drift["reference"]},
            "momentSeconds": round(moment_seconds, 3),
        },
        versions={"polars": pl.__version__},
    )
