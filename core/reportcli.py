"""`latentmas report`: markdown + PNG plots of a cycle's quality, read from object storage."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report",
        help="write a markdown report with plots for a finished cycle",
        description="Reads a cycle's manifests and evaluation from the stack's object store and writes "
        "OUT (markdown) plus OUT's stem folder of PNG plots.",
    )
    report.add_argument("-f", "--file", required=True, type=Path, help="LatentMASStack YAML")
    report.add_argument("--cycle-id", required=True, help="the cycle to report")
    report.add_argument("--previous", help="an earlier cycle id to compare against")
    report.add_argument("--store", type=Path, help="a folder used as the object store (embedded mode)")
    report.add_argument("-o", "--out", type=Path, default=Path("docs/report.md"), help="default docs/report.md")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from latentmas.localrun import load_stack, with_local_store
    from latentmas.report import read_cycle, write_report
    from latentmas.store import open_store

    stack = load_stack(args.file)
    if args.store:
        stack = with_local_store(stack, args.store)
    storage = stack.spec.storage
    store = open_store(storage)
    bucket = storage.artifacts_bucket
    current = read_cycle(store, bucket, stack.namespace, stack.name, args.cycle_id)
    previous = read_cycle(store, bucket, stack.namespace, stack.name, args.previous) if args.previous else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_report(current, previous, args.out)}")
    return 0
