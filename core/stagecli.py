"""`latentmas stage …`: run one cycle stage, the command every stage Job's container runs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    stage = subparsers.add_parser("stage", help="run one evolution-cycle stage")
    actions = stage.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="run a stage from a JSON/YAML config; a no-op when its manifest already exists",
        description="Runs one stage and writes its _manifest.json last.",
    )
    run.add_argument("stage", help="stage name (clean, quant, synth, index, base, train, router, ...)")
    run.add_argument("--config", required=True, type=Path, help="StageConfig file (JSON or YAML)")
    run.set_defaults(handler=_run)
    listing = actions.add_parser("list", help="list the known stages")
    listing.set_defaults(handler=_list)


def _run(args: argparse.Namespace) -> int:
    from latentmas.localrun import load_document
    from latentmas.stage import load_stage_config, run_stage

    where = f"--config {args.config}"
    config = load_stage_config(load_document(args.config, where), where)
    if int(os.environ.get("RANK", "0")) > 0:  # a torchrun follower: rank 0 writes the artifacts and manifest
        from latentmas.training.distributed import run_follower

        run_follower(args.stage, config)
        return 0
    manifest = run_stage(args.stage, config)
    print(json.dumps({"stage": manifest["stage"], "outputs": len(manifest["outputs"]), "counts": manifest["counts"]}))
    return 0


def _list(args: argparse.Namespace) -> int:
    from latentmas.stage import STAGES

    for name in sorted(STAGES):
        print(f"{name}\t{STAGES[name]}")
    return 0
