"""`latentmas corpus …`: regenerate the bundled sample corpus, or upload a corpus folder to a raw bucket."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    corpus = subparsers.add_parser("corpus", help="generate or upload the sample corpus")
    actions = corpus.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = actions.add_parser(
        "generate",
        help="regenerate the sample corpus from installed Debian/PyPI packages (deterministic)",
        description="Writes <out>/<domain>/<files> and SOURCES.json (provenance and license per file).",
    )
    generate.add_argument("--out", type=Path, default=None, help="output folder (default: the bundled data/corpus)")
    generate.add_argument("--math", type=int, default=900, help="number of generated math problems")
    generate.add_argument(
        "--extension-only", action="store_true", help="rewrite only the files outside the demo sample"
    )
    generate.set_defaults(handler=_generate)
    upload = actions.add_parser(
        "upload",
        help="upload a corpus folder into the raw bucket as <prefix><domain>/<file>",
        description="Credentials come from LATENTMAS_S3_ACCESS_KEY / LATENTMAS_S3_SECRET_KEY.",
    )
    upload.add_argument("--endpoint", required=True, help="S3 endpoint host:port, or file:///path for a local store")
    upload.add_argument("--bucket", default="raw", help="raw bucket (created when missing)")
    upload.add_argument("--prefix", default="", help="key prefix before the domain folder")
    upload.add_argument("--folder", type=Path, default=None, help="corpus folder (default: the bundled one)")
    upload.add_argument("--secure", action="store_true", help="use TLS")
    upload.add_argument(
        "--full", action="store_true", help="the whole corpus, not only the demo sample (about 3x the documents)"
    )
    upload.set_defaults(handler=_upload)


def _generate(args: argparse.Namespace) -> int:
    from latentmas.jobs.corpus import default_corpus_dir, main

    extension = ["--extension-only"] if args.extension_only else []
    return main(["--out", str(args.out or default_corpus_dir()), "--math", str(args.math), *extension])


def _upload(args: argparse.Namespace) -> int:
    from latentmas.jobs.corpus import default_corpus_dir, upload_corpus
    from latentmas.spec import StorageSpec
    from latentmas.store import open_store

    store = open_store(StorageSpec(endpoint=args.endpoint, secure=args.secure))
    keys = upload_corpus(store, args.bucket, args.folder or default_corpus_dir(), args.prefix, full=args.full)
    print(f"uploaded {len(keys)} objects to {args.bucket}/{args.prefix}")
    return 0
