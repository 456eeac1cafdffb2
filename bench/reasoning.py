"""Latent vs text multi-agent pipeline on the same queries: generated tokens and wall time per query,
and the ratios (issue goals on GPU: >= 70% fewer tokens, >= 3x faster).

    .venv/bin/python -m bench.reasoning                 # CUDA when present (1.1b preset, bf16), else CPU preset
    .venv/bin/python -m bench.reasoning --device cpu --queries 4

Both pipelines run the same four agents with the same decode limit per agent and greedy decoding on a
random-initialized Llama (no downloads): the text baseline decodes for every agent, the latent
pipeline only for the Judger. Random weights rarely emit EOS, so every decoding agent uses its full
limit; on a trained model both counts drop, the text pipeline's by its agents' actual lengths."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from latentmas.services.latent_pipeline import LatentConfig, run_latent
from latentmas.services.text_pipeline import PipelineResult, Sampling, run_text
from latentmas.services.toymodel import PRESETS, build_tokenizer, llama_config

QUERIES = [
    "what is the risk of a bond when the rate rises ?",
    "how should a court read a contract claim ?",
    "what dose should a patient in a trial get ?",
    "why does the function return an error value ?",
    "how do i deploy a model to a cluster node ?",
    "what is the price of a stock when the market yield is two ?",
    "who is the judge in the case ?",
    "when is the test run on the build ?",
]


def build_model(preset: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = llama_config(preset, tokenizer)
    torch.manual_seed(0)
    with device:
        model: Any = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    return model, tokenizer


def timed(fn: Any, device: torch.device) -> tuple[PipelineResult, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result: PipelineResult = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reasoning", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument(
        "--preset", default=None, help=f"model shape: {', '.join(PRESETS)} (default: 1.1b on cuda, cpu)"
    )
    parser.add_argument("--queries", type=int, default=len(QUERIES), help="how many queries to run (max 8)")
    parser.add_argument("--latent-steps", type=int, default=16, help="latent steps per thinking agent")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="decode limit of every decoding agent")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 avoids oversubscription)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    preset = args.preset or ("1.1b" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = build_model(preset, device, dtype)
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    config = LatentConfig(latent_steps=args.latent_steps)
    queries = QUERIES[: max(1, min(args.queries, len(QUERIES)))]
    print(
        f"device={device} preset={preset} dtype={dtype} latent_steps={args.latent_steps} "
        f"max_new_tokens={args.max_new_tokens} queries={len(queries)}",
        flush=True,
    )

    run_latent(model, tokenizer, queries[:1], Sampling(max_new_tokens=4), config)  # warm-up (kernels, W_a)
    run_text(model, tokenizer, queries[:1], Sampling(max_new_tokens=4))
    rows = []
    print(f"{'query':>5} {'text tok':>8} {'latent tok':>10} {'text s':>8} {'latent s':>9}")
    for i, query in enumerate(queries):
        text, text_s = timed(lambda q=query: run_text(model, tokenizer, [q], sampling), device)
        latent, latent_s = timed(lambda q=query: run_latent(model, tokenizer, [q], sampling, config), device)
        rows.append(
            {
                "text_tokens": text.generated_tokens,
                "latent_tokens": latent.generated_tokens,
                "text_seconds": text_s,
                "latent_seconds": latent_s,
                "latent_cache_length": latent.cache_length,
            }
        )
        print(
            f"{i:>5} {text.generated_tokens:>8} {latent.generated_tokens:>10} {text_s:>8.3f} {latent_s:>9.3f}",
            flush=True,
        )
    text_tokens = sum(r["text_tokens"] for r in rows)
    latent_tokens = sum(r["latent_tokens"] for r in rows)
    text_time = sum(r["text_seconds"] for r in rows)
    latent_time = sum(r["latent_seconds"] for r in rows)
    summary = {
        "device": str(device),
        "preset": preset,
        "latent_steps": args.latent_steps,
        "max_new_tokens": args.max_new_tokens,
        "queries": len(rows),
        "tokens_per_query": {"text": text_tokens / len(rows), "latent": latent_tokens / len(rows)},
        "seconds_per_query": {"text": text_time / len(rows), "latent": latent_time / len(rows)},
        "median_seconds": {
            "text": statistics.median(r["text_seconds"] for r in rows),
            "latent": statistics.median(r["latent_seconds"] for r in rows),
        },
        "token_reduction": 1 - latent_tokens / text_tokens,
        "speedup": text_time / latent_time,
        "rows": rows,
    }
    print(
        f"tokens/query: text {summary['tokens_per_query']['text']:.1f}, latent "
        f"{summary['tokens_per_query']['latent']:.1f} -> {100 * summary['token_reduction']:.1f}% fewer (goal >= 70%)"
    )
    print(
        f"seconds/query: text {summary['seconds_per_query']['text']:.3f}, latent "
        f"{summary['seconds_per_query']['latent']:.3f} -> {summary['speedup']:.2f}x faster (goal >= 3x)"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
