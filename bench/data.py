"""Data-plane benchmarks, each against a baseline measured in the same run.

1. clean: the Spark engine's throughput (MB/s of raw objects) with 1 and 2 executor JVMs
   (`local-cluster`) vs the python engine, all as the real stage on the same objects in a real MinIO
   (the sample corpus, uploaded `--copies` times).
2. quant: the whole stage (scout, streaming curator, quality ranking, insights, manifest) on a
   `--rows` x 20 metrics parquet at degree 2, then the feature write alone (Polars streaming sink vs
   eager DataFrame), each in a fresh subprocess so that its peak RSS is its own.
3. dedupe: the python clean engine on 10,000 near-duplicate files (1,000 families of 10), with the
   banded MinHash LSH; baseline: exact all-pairs Jaccard (what a table without banding degrades to)
   on `--baseline-files` of them.

    .venv/bin/python -m bench.data                       # defaults: 4 corpus copies, 1M x 20, 10,000 files
    .venv/bin/python -m bench.data --copies 1 --rows 200000 --skip clean --skip quant
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from latentmas.jobs.corpus import corpus_files, default_corpus_dir
from latentmas.spec import LatentMASStackSpec, StorageSpec
from latentmas.stage import StageConfig, run_stage
from latentmas.store import ACCESS_KEY_ENV, SECRET_KEY_ENV, S3Store


def upload_copies(store: S3Store, prefix: str, copies: int) -> int:
    """The corpus `copies` times under `prefix` (file names made unique per copy); returns bytes."""
    root = default_corpus_dir()
    total = 0
    for copy in range(copies):
        for path in corpus_files(root):
            domain, rel = path.relative_to(root).as_posix().split("/", 1)
            store.put_file("raw", f"{prefix}{domain}/c{copy}-{rel}", path)
            total += path.stat().st_size
    return total


def clean_config(storage: StorageSpec, cycle: str, engine: str, prefix: str) -> StageConfig:
    spec = LatentMASStackSpec.model_validate(
        {
            "storage": storage.model_dump(by_alias=True),
            "experts": [{"name": "python", "domain": "python"}],
            "pipeline": {"cleaning": {"engine": engine, "rawPrefix": prefix}},
        }
    )
    return StageConfig(stack="bench", cycle_id=cycle, spec=spec)


SPARK_MASTERS = ("local-cluster[1,1,1024]", "local-cluster[2,1,1024]")  # 1 and 2 executor JVMs, 1 core each


def clean_worker(master: str, endpoint: str, copies: int) -> dict[str, Any]:
    """Runs in a subprocess (one Spark application per master): a warm-up clean, then the timed one."""
    from latentmas.spark import spark_session

    store = S3Store(endpoint, os.environ[ACCESS_KEY_ENV], os.environ[SECRET_KEY_ENV], False, "us-east-1")
    storage = StorageSpec(endpoint=endpoint)
    clock = time.perf_counter()
    spark = spark_session(storage, app_name="latentmas-bench", master=master)
    startup = time.perf_counter() - clock
    # The first Spark job of a JVM pays for class loading and JIT: measured apart, on the warm-up copy.
    tag = "".join(ch for ch in master if ch.isalnum())
    run_stage("clean", clean_config(storage, f"bench-warmup-{tag}", "spark", "warmup/"), store)
    clock = time.perf_counter()
    manifest = run_stage("clean", clean_config(storage, f"bench-spark-{tag}", "spark", "bench/"), store)
    seconds = time.perf_counter() - clock
    spark.stop()
    size = manifest["metrics"]["inputs"]["bytes"]
    return {"master": master, "executors": manifest["metrics"]["spark"]["executors"],
            "startupSeconds": round(startup, 2), "seconds": round(seconds, 2), "MBps": round(size / 1e6 / seconds, 3),
            "documents": manifest["counts"]["documents"], "chunks": manifest["counts"]["chunks"]}  # fmt: skip


def bench_clean(copies: int) -> dict[str, Any]:
    """The python engine in-process, then Spark with 1 and 2 executor JVMs (`local-cluster`), each
    application in its own subprocess, all on the same objects in one MinIO."""
    import pyspark
    from latentmas.testing.objectstore import MinioServer

    with tempfile.TemporaryDirectory(prefix="bench-minio-") as tmp:
        server = MinioServer(Path(tmp)).start()
        try:
            os.environ[ACCESS_KEY_ENV], os.environ[SECRET_KEY_ENV] = server.access_key, server.secret_key
            store = S3Store(server.endpoint, server.access_key, server.secret_key, False, "us-east-1")
            for bucket in ("raw", "artifacts"):
                store.ensure_bucket(bucket)
            storage = StorageSpec(endpoint=server.endpoint)
            size = upload_copies(store, "bench/", copies)
            upload_copies(store, "warmup/", 1)
            results: dict[str, Any] = {"inputMB": round(size / 1e6, 3), "copies": copies}
            clock = time.perf_counter()
            manifest = run_stage("clean", clean_config(storage, "bench-python", "python", "bench/"), store)
            seconds = time.perf_counter() - clock
            counts = manifest["counts"]
            results["python"] = {"seconds": round(seconds, 2), "MBps": round(size / 1e6 / seconds, 3),
                                 "documents": counts["documents"], "chunks": counts["chunks"]}  # fmt: skip
            print(f"clean python: {results['python']}", file=sys.stderr)
            env = {**os.environ, "SPARK_HOME": str(Path(pyspark.__file__).parent), "PYSPARK_PYTHON": sys.executable}
            for master in SPARK_MASTERS:
                command = [sys.executable, "-m", "bench.data", "--clean-worker", master, server.endpoint, str(copies)]
                done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
                run = json.loads(done.stdout.strip().splitlines()[-1])
                results[f"spark{run['executors']}"] = run
                run["vsPython"] = round(run["MBps"] / results["python"]["MBps"], 3)
                print(f"clean spark: {run}", file=sys.stderr)
            return results
        finally:
            server.stop()


def bench_dedupe(files: int, baseline_files: int) -> dict[str, Any]:
    from latentmas.jobs.clean import clean_python
    from latentmas.jobs.cleaning import shingles
    from latentmas.jobs.minhash import dedupe, is_similar, near_duplicate_families
    from latentmas.spec import CleaningSpec

    data = near_duplicate_families(families=files // 10, variants=10)
    objects = [(f"bench/{key}", len(text.encode()), [text.encode()]) for key, text in data]
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-dedupe-") as tmp:
        out = clean_python(objects, CleaningSpec(min_chars=100), Path(tmp))
        kept = sum(1 for _ in out.docs())
        out.spill.close()
    seconds = time.perf_counter() - clock
    items = [(key, shingles(text)) for key, text in data]
    clock = time.perf_counter()
    result = dedupe(items, 0.8)
    dedupe_seconds = time.perf_counter() - clock
    sample = items[:baseline_files]
    clock = time.perf_counter()
    pairs = sum(1 for i, (_, a) in enumerate(sample) for _, b in sample[:i] if is_similar(a, b, 0.8))
    baseline_seconds = time.perf_counter() - clock
    results = {
        "files": files,
        "cleanSeconds": round(seconds, 2),
        "kept": kept,
        "nearDuplicates": sum(1 for r in out.rejected if r.reason == "near_duplicate"),
        "dedupeSeconds": round(dedupe_seconds, 2),
        "candidatePairs": result.candidates,
        "similarPairs": result.similar,
        "peakRssMB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "baseline": {"files": len(sample), "allPairsSeconds": round(baseline_seconds, 2), "similarPairs": pairs},
    }
    print(f"dedupe: {results}", file=sys.stderr)
    return results


QUALITY_COLUMNS = ("unique_word_ratio", "stopword_ratio", "symbol_ratio")  # what quant's quality score reads


def make_numeric_parquet(path: Path, rows: int, cols: int, chunk: int = 100_000) -> dict[str, int]:
    """A rows x cols metrics parquet (the quality inputs among the columns, four domains), written in
    row groups so that making a 10M-row input does not itself need gigabytes; returns rows per domain."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    names = [*QUALITY_COLUMNS, *[f"x{j}" for j in range(cols - len(QUALITY_COLUMNS))]][:cols]
    domains = np.array(["python", "linux", "licenses", "math"])
    counts: dict[str, int] = {}
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        domain = domains[rng.integers(0, len(domains), n)]
        for d, c in zip(*np.unique(domain, return_counts=True), strict=True):
            counts[str(d)] = counts.get(str(d), 0) + int(c)
        columns = {"doc_id": pa.array([f"d{i}" for i in range(start, start + n)]), "domain": pa.array(domain)}
        columns.update(
            {name: pa.array(rng.random(n) if name in QUALITY_COLUMNS else rng.normal(size=n)) for name in names}
        )
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()
    return counts


def polars_worker(mode: str, source: Path, target: Path, degree: int) -> dict[str, Any]:
    """Runs in a subprocess: builds the features one way and reports time and its own peak RSS."""
    import polars as pl
    from latentmas.jobs.quant import ID_COLUMNS, feature_frame, stream_to

    clock = time.perf_counter()
    columns = [c for c in pl.read_parquet_schema(source) if c not in ID_COLUMNS]
    if mode == "streaming":
        stream_to(feature_frame(pl.scan_parquet(source), columns, degree), str(target))
    else:
        feature_frame(pl.read_parquet(source).lazy(), columns, degree).collect(engine="in-memory").write_parquet(target)
    seconds = time.perf_counter() - clock
    width = len(pl.read_parquet_schema(target))
    peak_mb = peak_rss_mb()
    return {"seconds": round(seconds, 2), "peakRssMB": round(peak_mb, 1), "columns": width}


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset by exec, unlike ru_maxrss, which a child started from a
    big parent such as pytest inherits), else ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quant_stage_worker(rows: int, cols: int, degree: int) -> dict[str, Any]:
    """Runs in a subprocess: the whole quant stage (scout, curator, quality, insights, manifest) on a
    rows x cols metrics parquet in a local file store, reporting time and this process's peak RSS."""
    import json as json_module

    from latentmas.store import LocalStore

    with tempfile.TemporaryDirectory(prefix="bench-quant-stage-") as tmp:
        storage = StorageSpec(endpoint=f"file://{tmp}")
        config = StageConfig(
            stack="bench",
            cycle_id="quant",
            spec=LatentMASStackSpec.model_validate(
                {
                    "storage": storage.model_dump(by_alias=True),
                    "experts": [{"name": "python", "domain": "python"}],
                    "pipeline": {"quant": {"polynomialDegree": degree}},
                }
            ),
        )
        store = LocalStore(Path(tmp))
        store.ensure_bucket("artifacts")
        clean = Path(tmp) / "artifacts" / "default" / "bench" / "cycles" / "quant" / "clean"
        clean.mkdir(parents=True)
        domains = make_numeric_parquet(clean / "metrics.parquet", rows, cols)
        manifest = {"stage": "clean", "counts": {f"domain_{d}": n for d, n in domains.items()}}
        (clean / "_manifest.json").write_text(json_module.dumps(manifest))
        before = peak_rss_mb()
        clock = time.perf_counter()
        result = run_stage("quant", config, store)
        seconds = time.perf_counter() - clock
    peak_mb = peak_rss_mb()
    return {"rows": rows, "columns": cols, "degree": degree, "seconds": round(seconds, 2),
            "peakRssMB": round(peak_mb, 1), "rssBeforeStageMB": round(before, 1),
            "generated": result["counts"]["generated"], "kept": result["counts"]["kept"]}  # fmt: skip


def run_quant_stage(rows: int, cols: int, degree: int) -> dict[str, Any]:
    """`quant_stage_worker` in a fresh interpreter, so the peak RSS is the stage's alone."""
    command = [sys.executable, "-m", "bench.data", "--quant-stage-worker", str(rows), str(cols), str(degree)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def bench_quant(rows: int, cols: int, degree: int) -> dict[str, Any]:
    results: dict[str, Any] = {"stage": run_quant_stage(rows, cols, degree)}
    print(f"quant stage: {results['stage']}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-polars-") as tmp:
        source = Path(tmp) / "metrics.parquet"
        make_numeric_parquet(source, rows, cols)
        results.update({"rows": rows, "columns": cols, "degree": degree})
        for mode in ("eager", "streaming"):
            done = subprocess.run(
                [sys.executable, "-m", "bench.data", "--worker", mode, str(source), str(Path(tmp) / f"{mode}.parquet")],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "BENCH_DEGREE": str(degree)},
            )
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"quant {mode}: {results[mode]}", file=sys.stderr)
        results["streamingVsEagerTime"] = round(results["streaming"]["seconds"] / results["eager"]["seconds"], 3)
        results["streamingVsEagerRss"] = round(results["streaming"]["peakRssMB"] / results["eager"]["peakRssMB"], 3)
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description="data-plane benchmarks")
    parser.add_argument("--copies", type=int, default=4, help="corpus copies uploaded for the clean benchmark")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=20)
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--files", type=int, default=10_000, help="near-duplicate files for the dedupe benchmark")
    parser.add_argument("--baseline-files", type=int, default=1_000, help="files compared all-pairs as the baseline")
    parser.add_argument("--skip", action="append", choices=["clean", "quant", "dedupe"], default=[],
                        help="leave a benchmark out (repeatable)")  # fmt: skip
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--quant-stage-worker", nargs=3, type=int, metavar=("ROWS", "COLS", "DEGREE"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--clean-worker", nargs=3, metavar=("MASTER", "ENDPOINT", "COPIES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quant_stage_worker:
        print(json.dumps(quant_stage_worker(*args.quant_stage_worker)))
        return 0
    if args.clean_worker:
        master, endpoint, copies = args.clean_worker
        print(json.dumps(clean_worker(master, endpoint, int(copies))))
        return 0
    if args.worker:
        mode, source, target = args.worker
        print(json.dumps(polars_worker(mode, Path(source), Path(target), int(os.environ.get("BENCH_DEGREE", "2")))))
        return 0
    report: dict[str, Any] = {}
    if "clean" not in args.skip:
        report["clean"] = bench_clean(args.copies)
    if "quant" not in args.skip:
        report["quant"] = bench_quant(args.rows, args.cols, args.degree)
    if "dedupe" not in args.skip:
        report["dedupe"] = bench_dedupe(args.files, args.baseline_files)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
