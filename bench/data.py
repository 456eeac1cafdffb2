"""Data-plane benchmarks, each against a baseline measured in the same run.

1. clean: the Spark engine's throughput (MB/s of raw objects) vs the python engine, both as the real
   stage on the same objects in a real MinIO (the sample corpus, uploaded `--copies` times).
2. quant: polynomial features (degree 2) of a 1M x 20 numeric parquet, Polars streaming sink vs
   eager DataFrame, each in a fresh subprocess so that its peak RSS is its own.
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


def bench_clean(copies: int) -> dict[str, Any]:
    from latentmas.spark import spark_session
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
            results: dict[str, Any] = {"inputMB": round(size / 1e6, 3), "copies": copies}
            clock = time.perf_counter()
            spark = spark_session(storage, app_name="latentmas-bench")
            results["sparkStartupSeconds"] = round(time.perf_counter() - clock, 2)
            # The first Spark job of a JVM pays for class loading and JIT: measured apart, on one copy.
            upload_copies(store, "warmup/", 1)
            clock = time.perf_counter()
            run_stage("clean", clean_config(storage, "bench-warmup", "spark", "warmup/"), store)
            results["sparkFirstRunSeconds"] = round(time.perf_counter() - clock, 2)
            for engine in ("python", "spark"):
                clock = time.perf_counter()
                manifest = run_stage("clean", clean_config(storage, f"bench-{engine}", engine, "bench/"), store)
                seconds = time.perf_counter() - clock
                results[engine] = {
                    "seconds": round(seconds, 2),
                    "MBps": round(size / 1e6 / seconds, 3),
                    "documents": manifest["counts"]["documents"],
                    "chunks": manifest["counts"]["chunks"],
                }
                print(f"clean {engine}: {results[engine]}", file=sys.stderr)
            spark.stop()
            results["sparkVsPython"] = round(results["spark"]["MBps"] / results["python"]["MBps"], 3)
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


def make_numeric_parquet(path: Path, rows: int, cols: int) -> None:
    import polars as pl

    rng = np.random.default_rng(0)
    frame = pl.DataFrame({"doc_id": [f"d{i}" for i in range(rows)], "domain": ["bench"] * rows})
    frame = frame.with_columns([pl.Series(f"x{j}", rng.normal(size=rows)) for j in range(cols)])
    frame.write_parquet(path, row_group_size=100_000)


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
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "peakRssMB": round(peak_mb, 1), "columns": width}


def bench_quant(rows: int, cols: int, degree: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-polars-") as tmp:
        source = Path(tmp) / "metrics.parquet"
        make_numeric_parquet(source, rows, cols)
        results: dict[str, Any] = {"rows": rows, "columns": cols, "degree": degree}
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
    args = parser.parse_args(argv)
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
