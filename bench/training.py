"""LoRA SFT throughput and peak memory: the training stage's configuration against trl's defaults, on the
same data and the same randomly initialised Llama, measured in the same run.

    .venv/bin/python -m bench.training                 # auto: GPU 'large' preset (~0.6B) if CUDA, else CPU 'tiny'
    .venv/bin/python -m bench.training --preset small --steps 30

Each variant runs in its own process so peak memory is its own: CUDA max_memory_allocated on a GPU,
on a CPU the growth of the process's max RSS during training. Tokens/s counts non-padding tokens
after `--warmup` steps."""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

VARIANTS = ("stage", "trl-defaults")
WORDS = (
    "interest",
    "rate",
    "bond",
    "yield",
    "equity",
    "dividend",
    "margin",
    "capital",
    "liquidity",
    "credit",
    "loan",
    "reserve",
    "audit",
    "revenue",
    "dose",
    "patient",
    "kidney",
    "plasma",
    "tablet",
    "therapy",
    "symptom",
    "clinic",
    "surgery",
    "infection",
    "vaccine",
    "module",
    "function",
    "compiler",
    "thread",
    "memory",
    "cache",
    "latency",
    "query",
    "index",
    "schema",
    "deploy",
    "rollback",
)


def chat_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Chat examples of realistic, varied length: a question and a multi-sentence answer."""
    rng = random.Random(seed)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    return [
        {
            "messages": [
                {"role": "user", "content": sentence(rng.randint(6, 16)).rstrip(".") + "?"},
                {
                    "role": "assistant",
                    "content": " ".join(sentence(rng.randint(8, 20)) for _ in range(rng.randint(1, 6))),
                },
            ]
        }
        for _ in range(count)
    ]


def make_base(folder: Path, preset_name: str, rows: list[dict[str, Any]]) -> None:
    """A random-initialised Llama of the preset with a BPE tokenizer trained on the benchmark text."""
    from latentmas.training.presets import PRESETS, llama_config_kwargs
    from latentmas.training.tokenizer import train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = PRESETS[preset_name]
    texts = [m["content"] for row in rows for m in row["messages"]]
    tokenizer = train_tokenizer(texts, min(preset.vocab, 4096))
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(**llama_config_kwargs(preset, preset.vocab, special))
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def run_variant(
    variant: str, base: Path, data: Path, steps: int, warmup: int, batch: int, threads: int
) -> dict[str, Any]:
    """Trains `steps` steps of one variant in this process and measures it."""
    import torch
    from datasets import Dataset
    from latentmas.spec import ExpertSpec, LatentMASStackSpec
    from latentmas.training.sft import sft_arguments, sft_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(threads)
    rows = json.loads(data.read_text())
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = tempfile.mkdtemp(prefix=f"bench-{variant}-")
    spec = LatentMASStackSpec.model_validate(
        {
            "baseModel": {"dtype": "bfloat16" if gpu else "float32"},
            "experts": [{"name": "bench", "domain": "bench"}],
            "pipeline": {"training": {"maxSteps": steps, "batchSize": batch, "maxSeqLength": 512, "saveSteps": 10**6}},
        }
    )
    if variant == "stage":
        dtype = torch.bfloat16 if gpu else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        args = sft_arguments(spec, spec.experts[0], out, gpu)
        args.save_strategy = "no"
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        args = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch,
            report_to="none",
            save_strategy="no",
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
            use_cpu=not gpu,
            bf16=gpu,
        )

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup:
                if gpu:
                    torch.cuda.synchronize()
                marks["t0"], marks["n0"] = time.perf_counter(), float(state.num_input_tokens_seen)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if gpu:
                torch.cuda.synchronize()
            marks["t1"], marks["n1"] = time.perf_counter(), float(state.num_input_tokens_seen)

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if variant == "stage":  # what the train stage runs: answer-only labels in the base's template, LoRA
        lora = ExpertSpec(name="bench", domain="bench").lora
        trainer = sft_trainer(model, tokenizer, [row["messages"] for row in rows], args, lora, [Clock()])
    else:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    trainer.train()
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    parameters = list(cast(torch.nn.Module, trainer.model).parameters())
    return {
        "variant": variant,
        "device": torch.cuda.get_device_name() if gpu else f"cpu x{threads} threads",
        "tokens_per_s": (marks["n1"] - marks["n0"]) / (marks["t1"] - marks["t0"]),
        "peak_mib": peak,
        "rss_before_train_mib": None if gpu else rss_before,
        "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
        "total_params": sum(p.numel() for p in parameters),
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["auto", "tiny", "small", "base", "large"], default="auto")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default 40 CPU / 30 GPU)")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the tokens/s timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared box)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(
            json.dumps(
                run_variant(args.variant, args.base, args.data, args.steps, args.warmup, args.batch, args.threads)
            )
        )
        return

    import torch

    gpu = torch.cuda.is_available()
    preset = args.preset if args.preset != "auto" else ("large" if gpu else "tiny")
    steps = args.steps or (30 if gpu else 40)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        rows = chat_rows(2000, seed=0)
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps(rows))
        make_base(Path(tmp) / "base", preset, rows)
        results = {}
        for variant in VARIANTS:
            command = [
                sys.executable,
                "-m",
                "bench.training",
                "--variant",
                variant,
                "--base",
                f"{tmp}/base",
                "--data",
                str(data),
                "--steps",
                str(steps),
                "--warmup",
                str(args.warmup),
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"bench.training: {variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    stage, default = results["stage"], results["trl-defaults"]
    print(f"preset={preset} steps={steps} warmup={args.warmup} batch={args.batch} device={stage['device']}")
    print(f"{'variant':<14}{'tokens/s':>12}{'peak MiB':>12}{'trainable':>14}{'total params':>14}")
    for r in (stage, default):
        print(
            f"{r['variant']:<14}{r['tokens_per_s']:>12.0f}{r['peak_mib']:>12.0f}{r['trainable_params']:>14,}{r['total_params']:>14,}"
        )
    print(
        f"ratio stage/trl-defaults: tokens/s x{stage['tokens_per_s'] / default['tokens_per_s']:.2f}, "
        f"peak memory x{stage['peak_mib'] / default['peak_mib']:.2f}"
    )
    print(json.dumps({"preset": preset, "steps": steps, "results": results}))


if __name__ == "__main__":
    main()
