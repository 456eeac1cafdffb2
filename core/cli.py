"""The one command-line entry point: `latentmas …`.

Each command lives in its own module exposing `register(subparsers)`; those modules import heavy
libraries (torch, Spark, kopf) only inside their handlers, so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "latentmas.stagecli",
    "latentmas.jobs.corpuscli",
    "latentmas.cyclecli",
    "latentmas.democli",
    "latentmas.reportcli",
    "latentmas.training.registrycli",
    "latentmas.services.servecli",
    "latentmas.kubecli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentmas",
        description="LatentMAS Stack: evolve and serve a team of LoRA experts on Kubernetes.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("LATENTMAS_DEBUG") == "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = args.handler(args)
    except KeyboardInterrupt:
        print("latentmas: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"latentmas {args.command}: error: {reason}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
