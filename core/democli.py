"""`latentmas demo`: the whole product on a laptop. An embedded object store (a folder), the bundled
corpus, one full evolution cycle with progress, then the inference service and UI with one routed answer."""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

DEMO_STACKS = {
    "smollm2": Path(__file__).with_name("demo-stack.yaml"),
    "tiny": Path(__file__).with_name("demo-stack-tiny.yaml"),
}
DEMO_ROOT = Path.home() / ".cache" / "latentmas"
SAMPLE_PROMPT = "How do I open a file for reading in Python?"
SAMPLE_MAX_TOKENS = 96


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run a whole evolution cycle locally on the bundled corpus, then serve it",
        description="Embedded object store + bundled corpus → clean, quant, synth, index, base, train per expert, "
        "router, evaluate, promote → inference service and UI. A second run reuses finished stages.",
    )
    demo.add_argument(
        "--workdir", type=Path, help=f"state folder (default {DEMO_ROOT}/demo-<preset>; a second run reuses it)"
    )
    demo.add_argument(
        "--preset",
        choices=sorted(DEMO_STACKS),
        default="smollm2",
        help="bundled stack: smollm2 (SmolLM2-135M-Instruct base, the default) or tiny (a bootstrapped toy model)",
    )
    demo.add_argument("--stack", type=Path, help="stack YAML (overrides --preset)")
    demo.add_argument("--cycle-id", default="demo-1", help="cycle id (re-using one resumes it)")
    demo.add_argument(
        "--parallel",
        type=int,
        default=max(1, os.cpu_count() or 1),
        help="stage runs at once, the cores shared between them (default: one per core)",
    )
    demo.add_argument("--port", type=int, default=8000, help="port of the inference service (default 8000)")
    demo.add_argument("--no-serve", action="store_true", help="stop after the cycle instead of serving")
    demo.set_defaults(handler=_demo)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.loads(response.read()))


def port_in_use(port: int) -> bool:
    """Whether something on this machine already listens on the loopback `port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _wait_ready(url: str, timeout: float, thread: threading.Thread) -> None:
    """Waits for OUR server (`thread`) to answer /ready: a server of another process on the port does not count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError(f"the inference service stopped before it was ready on {url} (see the log above)")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the inference service at {url} was not ready after {timeout:.0f} s")


def _demo(args: argparse.Namespace) -> int:
    from latentmas.cycle import StageRun, cycle_runs
    from latentmas.jobs.corpus import default_corpus_dir, upload_corpus
    from latentmas.localrun import StageTiming, load_stack, run_cycle, timing_table, with_local_store
    from latentmas.store import open_store
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not args.no_serve and port_in_use(args.port):  # found now, not after a cycle of several minutes
        raise RuntimeError(f"--port {args.port}: the port is in use (another demo?); pick another or use --no-serve")
    console = Console()
    args.workdir = args.workdir or DEMO_ROOT / f"demo-{args.preset}"
    store_root = args.workdir / "store"
    stack = with_local_store(load_stack(args.stack or DEMO_STACKS[args.preset]), store_root)
    storage = stack.spec.storage
    store = open_store(storage)
    for bucket in (storage.raw_bucket, storage.artifacts_bucket):
        store.ensure_bucket(bucket)
    if not any(True for _ in store.list(storage.raw_bucket)):
        uploaded = upload_corpus(store, storage.raw_bucket, default_corpus_dir())
        console.print(f"uploaded {len(uploaded)} raw documents from {default_corpus_dir()} into {store_root}")

    total = len(cycle_runs(stack.spec))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("evolution cycle", total=total)

        def show(run: StageRun, event: str, timing: StageTiming | None) -> None:
            if event == "start":
                progress.update(task, description=f"{run.id}")
                return
            took = "reused" if event == "reused" else f"{timing.seconds if timing else 0:.1f} s"
            progress.console.print(f"✔ {run.id:<16} {took}")
            progress.advance(task)

        report = run_cycle(stack, args.cycle_id, store, on_event=show, parallel=args.parallel)
    console.print(timing_table(report))
    if args.no_serve:
        return 0
    return _serve(stack, args, console)


def _serve(stack: Any, args: argparse.Namespace, console: Any) -> int:
    import uvicorn
    from latentmas.services.app import create_app
    from latentmas.services.settings import ServeSettings

    settings = ServeSettings.from_spec(
        stack.namespace, stack.name, stack.spec, device="cpu", cache_dir=args.workdir / "serve-cache"
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=args.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{args.port}"
    try:
        _wait_ready(url, 300, thread)
        answer = _post(
            f"{url}/reasoning/chat", {"prompt": SAMPLE_PROMPT, "max_tokens": SAMPLE_MAX_TOKENS, "pipeline": "single"}
        )
        console.print(f"\n[bold]inference service and UI:[/bold] {url}/")
        console.print(f"[bold]Q:[/bold] {SAMPLE_PROMPT}")
        console.print(
            f"[bold]A[/bold] ({answer.get('domain')}, confidence {answer.get('domain_confidence')}): "
            f"{answer.get('response')}"
        )
        for citation in answer.get("citations") or []:
            console.print(f"  [dim][{citation['n']}] {citation['source']}:[/dim] {citation['text'][:100]}")
        console.print("Ctrl-C stops the service.")
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        console.print("stopping …")
    finally:
        server.should_exit = True
        thread.join(10)
    return 0
