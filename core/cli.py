"""The one command-line entry point: `latentmas …`.

Each command lives in its own module exposing `register(subparsers)`; those modules import heavy
libraries (torch, Spark, kopf) only inside their handlers, so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
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
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not as a traceback at exit
    except KeyboardInterrupt:
        print("latentmas: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if isinstance(err, BrokenPipeError) and _stdout_closed():
            # The reader of our output is gone: end quietly, as a process killed by SIGPIPE would (128 + 13).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        if debug:
            raise
        print(f"latentmas {args.command}: error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


ONE_LINE_CHARS = 600  # a pasted subprocess or JVM trace stays one readable line


def one_line(err: BaseException) -> str:
    """The error as the one line a command prints: every line of its message, joined (a first line alone can
    be only a parser's context, e.g. "while parsing a flow sequence"); the type's name when it has none."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= ONE_LINE_CHARS else text[:ONE_LINE_CHARS] + " … (--debug shows all of it)"


def _stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no fileno (captured), closed, or no poll on this platform
        return False
