"""Serving benchmark (issue 5): mixed-adapter decode throughput against the base model and against PEFT,
and hot reload under load. Every ratio is against a baseline measured in the same run.

    .venv/bin/python -m bench.serving            # CPU: small model; CUDA: the 1.1B Llama config

On CUDA the defaults become the issue's setup (1.1B random Llama, batch 64, prompt 128, rank 16 on all
linear layers, 1/8/32/64 distinct adapters, 200 reloads) and the base baseline uses the static cache
compiled with torch.compile, the fastest way transformers offers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from latentmas.services.engine import Engine, Sequence
from latentmas.services.lora import install_multi_lora, load_peft_adapter
from latentmas.services.sampling import SamplingParams
from latentmas.services.server import GenerationRequest, InferenceServer
from latentmas.services.settings import ServeSettings
from latentmas.services.toymodel import build_adapter, build_base, publish
from latentmas.spec import InferenceSpec, StorageSpec
from latentmas.store import LocalStore, ObjectStore
from latentmas.training.architectures import discover_target_modules
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


@dataclass(frozen=True)
class Setup:
    device: torch.device
    preset: str
    dtype: torch.dtype
    batch: int
    prompt: int
    new_tokens: int
    rank: int
    distinct: list[int]
    reloads: int
    peft_max: int


def _setup(args: argparse.Namespace) -> Setup:
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    return Setup(
        device=device,
        preset=args.preset or ("1.1b" if cuda else "cpu"),
        dtype=torch.bfloat16 if cuda else torch.float32,
        batch=args.batch or (64 if cuda else 16),
        prompt=args.prompt or (128 if cuda else 32),
        new_tokens=args.new_tokens or (128 if cuda else 32),
        rank=args.rank,
        distinct=args.distinct or ([1, 8, 32, 64] if cuda else [1, 8, 16]),
        reloads=args.reloads or (200 if cuda else 20),
        peft_max=args.peft_max,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device: torch.device, fn: Callable[[], Any], repeats: int = 3) -> float:
    """Best of `repeats` timed calls after a warm-up call (compilation, allocator). All run in a fresh
    thread, the way the engine runs: on an oversubscribed CPU, torch ops issued from the main thread were
    measured 20x slower than the same ops from another thread, which would flatter our engine."""
    elapsed: list[float] = []

    def body() -> None:
        with torch.inference_mode():
            fn()
            for _ in range(repeats):
                _sync(device)
                started = time.perf_counter()
                fn()
                _sync(device)
                elapsed.append(time.perf_counter() - started)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    if not elapsed:
        raise RuntimeError("benchmark step failed (see the traceback above)")
    return min(elapsed)


def _prompts(vocab: int, setup: Setup) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab, (setup.batch, setup.prompt), generator=generator)


def _load_base(folder: Path, setup: Setup) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=setup.dtype)
    cast(torch.nn.Module, model).to(device=setup.device)
    return model.eval()


def base_generate(folder: Path, ids: torch.Tensor, setup: Setup) -> float:
    """Tokens/s of plain transformers generate without LoRA (static cache + compile on CUDA)."""
    model = _load_base(folder, setup)
    # with a static cache on CUDA, generate compiles the decode step itself
    extra: dict[str, Any] = {"cache_implementation": "static"} if setup.device.type == "cuda" else {}
    ids = ids.to(setup.device)
    mask = torch.ones_like(ids)

    def run() -> None:
        with torch.inference_mode():
            cast(Any, model).generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=setup.new_tokens,
                min_new_tokens=setup.new_tokens,
                do_sample=False,
                **extra,
            )

    return setup.batch * setup.new_tokens / _timed(setup.device, run)


def engine_generate(folder: Path, adapters: list[Path], ids: torch.Tensor, distinct: int, setup: Setup) -> float:
    """Tokens/s of our engine with `distinct` different adapters spread over the batch (0 = base rows)."""
    model = _load_base(folder, setup)
    slots = max(distinct, 1)
    served = install_multi_lora(model, discover_target_modules(model), slots=slots, max_rank=setup.rank)
    for slot in range(distinct):
        served.write_slot(slot, load_peft_adapter(adapters[slot % len(adapters)], served.shapes))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = Engine(served, tokenizer, max_batch_size=setup.batch)
    engine.eos_ids = []
    engine.start()

    def run() -> None:
        done = threading.Semaphore(0)
        for row in range(setup.batch):
            mix = [(row % distinct, 1.0)] if distinct else []
            params = SamplingParams(max_tokens=setup.new_tokens)
            engine.submit(Sequence(ids[row].tolist(), params, mix, lambda _: None, lambda _: done.release()))
        for _ in range(setup.batch):
            done.acquire()

    try:
        return setup.batch * setup.new_tokens / _timed(setup.device, run)
    finally:
        engine.stop()


def peft_generate(
    folder: Path, adapters: list[Path], ids: torch.Tensor, distinct: int, setup: Setup
) -> dict[str, float]:
    """PEFT baselines: one mixed batch with `adapter_names`, and `set_adapter` switching per adapter group."""
    from peft import PeftModel

    model = _load_base(folder, setup)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for slot in range(1, distinct):
        peft_model.load_adapter(adapters[slot % len(adapters)], adapter_name=f"a{slot}")
    peft_model.to(setup.device)
    ids = ids.to(setup.device)
    names = [f"a{row % distinct}" for row in range(setup.batch)]
    kwargs = {"max_new_tokens": setup.new_tokens, "min_new_tokens": setup.new_tokens, "do_sample": False}

    def mixed() -> None:
        with torch.inference_mode():
            peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)

    def switching() -> None:
        with torch.inference_mode():
            for slot in range(distinct):
                rows = [r for r in range(setup.batch) if r % distinct == slot]
                peft_model.set_adapter(f"a{slot}")
                sub = ids[rows]
                peft_model.generate(input_ids=sub, attention_mask=torch.ones_like(sub), **kwargs)

    tokens = setup.batch * setup.new_tokens
    return {
        "adapter_names": tokens / _timed(setup.device, mixed),
        "set_adapter": tokens / _timed(setup.device, switching),
    }


def _memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated())
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open_store(root: Path) -> tuple[ObjectStore, StorageSpec, Callable[[], None]]:
    """The real MinIO when its test binary is available, else the local folder store."""
    try:
        from latentmas.testing.objectstore import MinioServer

        server = MinioServer(root / "minio").start()
    except Exception:
        storage = StorageSpec(endpoint=f"file://{root / 'store'}")
        store: ObjectStore = LocalStore(root / "store")
        store.ensure_bucket("artifacts")
        return store, storage, lambda: None
    from latentmas.store import S3Store

    s3 = S3Store(server.endpoint, server.access_key, server.secret_key, secure=False, region="us-east-1")
    s3.ensure_bucket("artifacts")
    return s3, StorageSpec(endpoint=server.endpoint), server.stop


def hot_reload(folder: Path, adapters: list[Path], root: Path, setup: Setup) -> dict[str, Any]:
    """Publishes `reloads` new versions while 4 clients keep generating; measures registry write -> first
    response served by the new version, failed requests, and memory drift."""
    store, storage, stop_store = _open_store(root)
    publish(store, "artifacts", "bench", "stack", "base", "base", folder)
    publish(store, "artifacts", "bench", "stack", "experts", "expert", adapters[0])
    settings = ServeSettings(
        namespace="bench",
        stack="stack",
        storage=storage,
        inference=InferenceSpec(reload_poll_seconds=0.05, adapter_slots=4, max_lora_rank=setup.rank),
        cache_dir=root / "cache",
        device=str(setup.device),
        notifications=False,
    )
    server = InferenceServer(settings, store).start()
    if not server.wait_ready(120):
        raise RuntimeError(f"server not ready: {server.startup_error}")
    request = GenerationRequest(
        prompt="what is the market price", params=SamplingParams(max_tokens=8), adapter="expert"
    )

    async def run() -> dict[str, Any]:
        failures, served = 0, 0
        stop = asyncio.Event()

        async def client() -> None:
            nonlocal failures, served
            while not stop.is_set():
                try:
                    await server.generate(request)
                    served += 1
                except Exception:
                    failures += 1

        clients = [asyncio.create_task(client()) for _ in range(4)]
        latencies: list[float] = []
        baseline = 0
        for index in range(setup.reloads):
            if index == 2:
                baseline = _memory(setup.device)
            started = time.perf_counter()
            _, version = await asyncio.to_thread(
                publish, store, "artifacts", "bench", "stack", "experts", "expert", adapters[(index + 1) % 2]
            )
            while (await server.generate(request)).experts[0][1] != version:
                await asyncio.sleep(0.005)
            latencies.append(time.perf_counter() - started)
        stop.set()
        await asyncio.gather(*clients)
        drift = (_memory(setup.device) - baseline) / baseline
        ordered = sorted(latencies)
        return {
            "reloads": len(latencies),
            "p50_s": statistics.median(ordered),
            "p95_s": ordered[max(0, round(0.95 * len(ordered)) - 1)],
            "failed_requests": failures,
            "served_requests": served,
            "memory_drift": drift,
            "memory_kind": "cuda allocated" if setup.device.type == "cuda" else "process RSS",
        }

    try:
        return asyncio.run(run())
    finally:
        server.stop()
        stop_store()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--preset", choices=["test", "cpu", "1.1b"], default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--distinct", type=int, nargs="*", default=None, help="distinct adapters per batch")
    parser.add_argument("--reloads", type=int, default=None)
    parser.add_argument("--peft-max", type=int, default=64, help="skip PEFT baselines above this many adapters")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    setup = _setup(args)
    if setup.device.type == "cpu":
        torch.set_num_threads(1)  # shared small CPU boxes: OpenMP spinning made timings swing 20x
    torch.manual_seed(0)
    print(
        f"device={setup.device} preset={setup.preset} dtype={setup.dtype} batch={setup.batch} "
        f"prompt={setup.prompt} new_tokens={setup.new_tokens} rank={setup.rank} torch={torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        folder = build_base(root / "base", preset=setup.preset, dtype=setup.dtype)
        adapters = [build_adapter(folder, root / f"adapter-{i}", seed=i, rank=setup.rank) for i in range(8)]
        ids = _prompts(AutoTokenizer.from_pretrained(folder).vocab_size, setup)
        results: dict[str, Any] = {"setup": {k: str(v) for k, v in setup.__dict__.items()}}
        base = base_generate(folder, ids, setup)
        ours_base = engine_generate(folder, adapters, ids, 0, setup)
        results["base_tok_s"], results["engine_no_lora_tok_s"] = base, ours_base
        print(f"transformers generate, no LoRA: {base:9.1f} tok/s   (our engine, base rows: {ours_base:.1f})")
        rows = []
        for distinct in setup.distinct:
            ours = engine_generate(folder, adapters, ids, distinct, setup)
            row: dict[str, Any] = {"distinct": distinct, "engine_tok_s": ours, "vs_base": ours / base}
            if distinct <= setup.peft_max:
                peft = peft_generate(folder, adapters, ids, distinct, setup)
                row.update(
                    {
                        "peft_adapter_names_tok_s": peft["adapter_names"],
                        "peft_set_adapter_tok_s": peft["set_adapter"],
                        "x_adapter_names": ours / peft["adapter_names"],
                        "x_set_adapter": ours / peft["set_adapter"],
                    }
                )
            rows.append(row)
            print(
                f"{distinct:3d} distinct: ours {ours:9.1f} tok/s = {ours / base:5.2f}x base"
                + (
                    f" | PEFT adapter_names {row['peft_adapter_names_tok_s']:8.1f} ({row['x_adapter_names']:5.1f}x)"
                    f" | set_adapter {row['peft_set_adapter_tok_s']:8.1f} ({row['x_set_adapter']:5.1f}x)"
                    if "x_adapter_names" in row
                    else ""
                )
            )
        results["throughput"] = rows
        reload = hot_reload(folder, adapters, root, setup)
        results["hot_reload"] = reload
        print(
            f"hot reload x{reload['reloads']} under load: p50 {reload['p50_s']:.3f}s p95 {reload['p95_s']:.3f}s, "
            f"failed requests {reload['failed_requests']} of {reload['served_requests'] + reload['failed_requests']}, "
            f"{reload['memory_kind']} drift {100 * reload['memory_drift']:+.2f}%"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
