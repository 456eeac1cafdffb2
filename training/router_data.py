"""What routers learn from and are judged on. Training texts are the questions of the SFT train split with the
text that carries no domain removed (synthesis templates and documents' boilerplate headers: segments repeated
across many of a domain's prompts), the synth stage's paraphrase-style questions about train documents, and the
`tune` half of the hand-written natural questions, weighted NATURAL_WEIGHT times a synthetic text (few, but
what users ask). Routers are judged on the `test` half of the natural questions and on the held-out SFT
questions; no test-half question is ever trained on."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence

from latentmas.jobs.questions import load_natural_questions
from latentmas.prompts import routing_text
from latentmas.spec import ExpertSpec
from latentmas.stage import StageContext
from latentmas.training.data import read_sft, spread_by_document

NATURAL_WEIGHT = 10.0
SEGMENTS = re.compile(r'[\n:"]+|(?<=[.!?])\s+')
BOILERPLATE_SHARE = 0.2
MIN_REPEATS = 3

Labelled = tuple[list[str], list[int]]


def segments(text: str) -> list[str]:
    return [part.strip() for part in SEGMENTS.split(text) if part.strip()]


def boilerplate(texts: Sequence[str]) -> set[str]:
    """Segments (lines, sentences, template phrases) found in at least BOILERPLATE_SHARE of `texts` and at least
    MIN_REPEATS times: a header or template that every prompt of a kind repeats says nothing about the question."""
    counts = Counter(segment for text in texts for segment in set(segments(text)))
    needed = max(MIN_REPEATS, BOILERPLATE_SHARE * len(texts))
    return {segment for segment, count in counts.items() if count >= needed}


def strip_boilerplate(text: str, common: set[str]) -> str:
    kept = [segment for segment in segments(text) if segment not in common]
    return " ".join(kept) if kept else text


def domain_texts(texts: Sequence[str]) -> list[str]:
    """`texts` without the segments repeated across them (each text kept whole if nothing else is left)."""
    common = boilerplate(texts)
    return [strip_boilerplate(text, common) for text in texts]


def sft_questions(ctx: StageContext, experts: Sequence[ExpertSpec], split: str, limit: int | None) -> Labelled:
    """The routing text of each SFT example of `split`, boilerplate stripped per domain, labelled by expert."""
    texts: list[str] = []
    labels: list[int] = []
    for index, expert in enumerate(experts):
        rows = spread_by_document(read_sft(ctx, expert.domain, split), limit)
        texts += domain_texts([routing_text(row["messages"]) for row in rows])
        labels += [index] * len(rows)
    return texts, labels


def paraphrase_questions(ctx: StageContext, experts: Sequence[ExpertSpec], split: str) -> Labelled:
    """The synth stage's paraphrase-style questions (one per document of `split`), labelled by expert."""
    texts: list[str] = []
    labels: list[int] = []
    for index, expert in enumerate(experts):
        key = ctx.prefix("synth") + f"questions/{expert.domain}/{split}.jsonl"
        if not ctx.store.exists(ctx.bucket, key):
            continue
        lines = ctx.store.get_bytes(ctx.bucket, key).decode().splitlines()
        texts += [str(json.loads(line)["question"]) for line in lines if line.strip()]
        labels += [index] * (len(texts) - len(labels))
    return texts, labels


def natural_questions(experts: Sequence[ExpertSpec], half: str) -> Labelled:
    """The hand-written questions of `half` for the experts' domains (none for a domain without a question set)."""
    index = {expert.domain: i for i, expert in enumerate(experts)}
    texts: list[str] = []
    labels: list[int] = []
    for question in load_natural_questions(index):
        if question.half == half and question.domain in index:
            texts.append(question.question)
            labels.append(index[question.domain])
    return texts, labels


def combine(*parts: Labelled) -> Labelled:
    texts: list[str] = []
    labels: list[int] = []
    for part_texts, part_labels in parts:
        texts += part_texts
        labels += part_labels
    return texts, labels


def training_weights(synthetic: int, natural: int) -> list[float]:
    """Per-text weights of `combine(synthetic..., natural)`: 1 for each synthetic text, NATURAL_WEIGHT after."""
    return [1.0] * synthetic + [NATURAL_WEIGHT] * natural
