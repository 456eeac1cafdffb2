"""`latentmas cycle run --local -f stack.yaml`: one evolution cycle in this process."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    cycle = subparsers.add_parser("cycle", help="run an evolution cycle")
    actions = cycle.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="run every stage of a cycle for a stack spec",
        description="Runs clean → quant → synth → index → base → train → router → evaluate → promote for the "
        "stack in FILE (the same YAML the cluster takes). Finished stages of the same cycle id are reused.",
    )
    run.add_argument("-f", "--file", required=True, type=Path, help="LatentMASStack YAML")
    run.add_argument("--local", action="store_true", required=True, help="run in this process (the only mode here)")
    run.add_argument("--cycle-id", default="local", help="cycle id; re-running the same id resumes it")
    run.add_argument(
        "--store", type=Path, help="use a folder as the object store instead of spec.storage (embedded mode)"
    )
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from latentmas.cycle import StageRun
    from latentmas.localrun import StageTiming, load_stack, run_cycle, timing_table, with_local_store
    from latentmas.store import open_store

    stack = load_stack(args.file)
    if args.store:
        stack = with_local_store(stack, args.store)
    store = open_store(stack.spec.storage)
    for bucket in (stack.spec.storage.raw_bucket, stack.spec.storage.artifacts_bucket):
        store.ensure_bucket(bucket)

    def show(run: StageRun, event: str, timing: StageTiming | None) -> None:
        if event == "start":
            print(f"▶ {run.id} …", flush=True)
        else:
            took = timing.seconds if timing else 0.0
            print(f"✔ {run.id} {'(reused)' if event == 'reused' else f'in {took:.1f} s'}", flush=True)

    report = run_cycle(stack, args.cycle_id, store, on_event=show)
    print(timing_table(report))
    return 0
