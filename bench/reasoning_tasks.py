"""The accuracy benchmark's task set: questions with checkable answers.

- `math`: the corpus's generated math problems (data/corpus/math/problems-*.jsonl), a fixed sample:
  records whose id hashes below 0.1 with the data plane's hash (`jobs.splits.split_value`, seed 0; the
  benchmark runs the pretrained base, which no stage of this project trained on them), restricted to
  the single-number kinds (linear equations, GCD/LCM, arithmetic series); the gold answer is the number
  after `Answer:` in the record's own worked solution.
- `choice`: four-option multiple-choice questions, a few per corpus domain (python, math, linux,
  licenses), written for this project (MC_QUESTIONS below); the gold answer is a letter.
- `add`: single-digit additions a + b (1-9 each), drawn by `random.Random(ADD_SEED)`; a probe found the
  single agent at 7/16 (free answer, 24 tokens) and 6/16 (boxed, 64 tokens), where a guess among the 17
  possible sums is right 1 time in 17: the one task found on which SmolLM2-135M is clearly above chance.
- `arith`: one-step integer arithmetic (a + b and a - b with two-digit operands, a times b with a two-digit
  and a one-digit operand), drawn by `random.Random(ARITH_SEED)` for this benchmark (no model has seen
  these exact questions); the gold answer is computed. SmolLM2-135M is at chance on the two sets above
  and only barely above it here (docs/reasoning.md): no task on which this base scores clearly above
  chance has been found.

Answers are read the way the reference reads them: the last \\boxed{...} if there is one, otherwise the
last number (math) or the last standalone letter A-D (choice)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from latentmas.jobs.splits import split_value
from latentmas.services.agent_prompts import AnswerFormat

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus" / "math"
MATH_KINDS = ("Linear equation", "GCD and LCM", "Arithmetic series")
HELDOUT_FRACTION, SPLIT_SEED = 0.1, 0
ARITH_SEED = 16
ADD_SEED = 7
KINDS = ("arith", "math", "choice")


@dataclass(frozen=True)
class Task:
    id: str
    kind: str  # one of KINDS
    question: str
    gold: str

    @property
    def answer_format(self) -> AnswerFormat:
        return "choice" if self.kind == "choice" else "boxed"


MC_QUESTIONS: list[tuple[str, str, list[str], str]] = [
    ("python-1", "Which keyword defines a function in Python?", ["func", "def", "function", "lambda:"], "B"),
    ("python-2", "What does len([1, 2, 3]) return in Python?", ["2", "3", "4", "[3]"], "B"),
    ("python-3", "Which Python type is immutable?", ["list", "dict", "set", "tuple"], "D"),
    (
        "python-4",
        "Which statement handles an exception in Python?",
        ["try/except", "if/else", "for/in", "with/as"],
        "A",
    ),
    ("python-5", "What does the Python expression 7 // 2 evaluate to?", ["3.5", "4", "3", "1"], "C"),
    ("math-1", "What is 6 times 7?", ["36", "42", "48", "54"], "B"),
    ("math-2", "What is the derivative of x^2?", ["x", "2x", "x^3/3", "2"], "B"),
    ("math-3", "What is the greatest common divisor of 12 and 18?", ["3", "6", "9", "36"], "B"),
    ("math-4", "How many sides does a triangle have?", ["2", "3", "4", "5"], "B"),
    ("math-5", "What is 15 plus 27?", ["32", "42", "52", "41"], "B"),
    ("linux-1", "Which Linux command lists the files in a directory?", ["cd", "ls", "rm", "cat"], "B"),
    ("linux-2", "Which Linux command prints the current working directory?", ["pwd", "ps", "top", "df"], "A"),
    ("linux-3", "Which Linux command removes a file?", ["mv", "cp", "rm", "touch"], "C"),
    ("linux-4", "Which Linux command shows the contents of a text file?", ["cat", "kill", "mkdir", "chmod"], "A"),
    ("linux-5", "Which Linux command changes the current directory?", ["ls", "cd", "pwd", "echo"], "B"),
    ("licenses-1", "Which license is a copyleft license?", ["MIT", "BSD-2-Clause", "GPL-3.0", "Apache-2.0"], "C"),
    (
        "licenses-2",
        "Which license puts a work in the public domain?",
        ["CC0-1.0", "GPL-2.0", "LGPL-3.0", "MPL-2.0"],
        "A",
    ),
    (
        "licenses-3",
        "Which license includes an explicit patent grant?",
        ["MIT", "Apache-2.0", "BSD-3-Clause", "ISC"],
        "B",
    ),
    (
        "licenses-4",
        "What does GPL stand for?",
        ["General Public License", "Global Patent Law", "Good Practice List", "Generic Program Licence"],
        "A",
    ),
    ("licenses-5", "Which license is called a weak copyleft license?", ["MIT", "GPL-3.0", "LGPL-2.1", "CC0-1.0"], "C"),
]


def choice_tasks() -> list[Task]:
    tasks = []
    for task_id, question, options, gold in MC_QUESTIONS:
        lines = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", options, strict=True))
        tasks.append(Task(task_id, "choice", f"{question}\n{lines}", gold))
    return tasks


def math_tasks(folder: Path = CORPUS) -> list[Task]:
    tasks = []
    for path in sorted(folder.glob("problems-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the corpus keeps one deliberately malformed line for the data plane's tests
            if record["title"] not in MATH_KINDS or split_value(record["id"], SPLIT_SEED) >= HELDOUT_FRACTION:
                continue
            problem, _, solution = record["text"].partition("\n\nSolution:")
            gold = re.search(r"Answer:\s*(?:x\s*=\s*)?(-?\d+)", solution)
            if gold:
                tasks.append(Task(record["id"], "math", problem.removeprefix("Problem: ").strip(), gold.group(1)))
    return tasks


def arithmetic_tasks(count: int, seed: int = ARITH_SEED) -> list[Task]:
    rng = random.Random(seed)
    tasks = []
    for index in range(count):
        op = ("+", "-", "times")[index % 3]
        a = rng.randint(10, 99)
        b = rng.randint(2, 9) if op == "times" else rng.randint(10, 99)
        gold = a + b if op == "+" else a - b if op == "-" else a * b
        tasks.append(Task(f"arith-{index}", "arith", f"What is {a} {op} {b}?", str(gold)))
    return tasks


def addition_tasks(count: int, seed: int = ADD_SEED) -> list[Task]:
    """Single-digit additions ("What is 3 + 5?"), kind `arith` (numbers are read the same way)."""
    rng = random.Random(seed)
    tasks = []
    for index in range(count):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        tasks.append(Task(f"add-{index}", "arith", f"What is {a} + {b}?", str(a + b)))
    return tasks


def task_set(math: int, choice: int, arith: int = 0, add: int = 0) -> list[Task]:
    """`add` single-digit additions, `arith` arithmetic questions, `math` held-out math problems and `choice`
    multiple-choice questions (interleaved by domain)."""
    picked_choice = choice_tasks()
    per_domain: dict[str, list[Task]] = {}
    for task in picked_choice:
        per_domain.setdefault(task.id.split("-")[0], []).append(task)
    interleaved = [t for group in zip(*per_domain.values(), strict=True) for t in group]
    return addition_tasks(add) + arithmetic_tasks(arith) + math_tasks()[:math] + interleaved[:choice]


def extract(text: str, kind: str) -> str | None:
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        inner = boxed[-1].strip()
        found = re.search(r"\b[ABCD]\b" if kind == "choice" else r"-?\d+", inner)
        return found.group(0) if found else inner
    last = re.findall(r"\b([ABCD])\b" if kind == "choice" else r"-?\d+", text)
    return str(last[-1]) if last else None


def correct(task: Task, text: str) -> bool:
    return extract(text, task.kind) == task.gold
