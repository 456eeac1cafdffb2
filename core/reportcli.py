"""`latentmas report`: markdown + PNG plots of a cycle's quality, read from object storage."""

from __future__ import annotations

import argparse
import json
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
    report.add_argument("--citations", type=Path, help="a `latentmas citations` JSON to include")
    report.set_defaults(handler=_report)
    citations = subparsers.add_parser(
        "citations",
        help="measure how well answers are supported by the passages they cite (natural questions)",
        description="Answers the natural questions' test half with the stack's promoted base, each domain's "
        "promoted expert and the promoted index (single-expert path with RAG), and writes the share of answer "
        "sentences supported by the passages they cite, per domain, as JSON (docs/training.md).",
    )
    citations.add_argument("-f", "--file", required=True, type=Path, help="LatentMASStack YAML")
    citations.add_argument("--store", type=Path, help="a folder used as the object store (embedded mode)")
    citations.add_argument("--questions", type=int, default=10, help="test questions per domain (default 10)")
    citations.add_argument("--max-tokens", type=int, default=96, help="new tokens per answer (default 96)")
    citations.add_argument("-o", "--out", type=Path, default=Path("citations.json"), help="default citations.json")
    citations.set_defaults(handler=_citations)


def _report(args: argparse.Namespace) -> int:
    from latentmas.localrun import load_document, load_stack, with_local_store
    from latentmas.report import read_cycle, write_report
    from latentmas.store import open_store

    stack = load_stack(args.file)
    citations = load_document(args.citations, f"--citations {args.citations}") if args.citations else None
    if citations is not None and not isinstance(citations, dict):
        raise ValueError(f"--citations {args.citations}: expected the JSON object `latentmas citations` writes")
    if args.store:
        stack = with_local_store(stack, args.store)
    storage = stack.spec.storage
    store = open_store(storage)
    bucket = storage.artifacts_bucket
    current = read_cycle(store, bucket, stack.namespace, stack.name, args.cycle_id)
    previous = read_cycle(store, bucket, stack.namespace, stack.name, args.previous) if args.previous else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_report(current, previous, args.out, citations)}")
    return 0


def _citations(args: argparse.Namespace) -> int:
    from latentmas.localrun import load_stack, with_local_store
    from latentmas.store import open_store
    from latentmas.training.citations import measure

    stack = load_stack(args.file)
    if args.store:
        stack = with_local_store(stack, args.store)
    storage = stack.spec.storage
    result = measure(
        open_store(storage), storage.artifacts_bucket, stack.namespace, stack, args.questions, args.max_tokens
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for domain, row in result["per_domain"].items():
        print(f"{domain}: {row['supported_share']:.1%} of {row['sentences']} sentences supported")
    print(f"wrote {args.out}")
    return 0
