"""Train like you serve: SFT examples in the serving prompt layout, the question under numbered retrieved
passages (`latentmas.prompts.training_messages`). RAFT-style, the passages are the example's source chunk among
distractor chunks of other documents of the same domain (what retrieval returns beside the right passage), and
in a share of training examples the source is left out, so an expert also learns to answer when retrieval
missed. Evaluation uses the same layout with the source always present.

Passages are clipped so the prompt and the answer fit `maxSeqLength`; when less than MIN_PASSAGE_CHARS per
passage would be left, the example stays bare (a context clipped to a few words teaches nothing)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from latentmas.jobs.outputs import iter_jsonl
from latentmas.prompts import SYSTEM_PROMPT, routing_text, training_messages
from latentmas.stage import StageContext

CHUNKS = "rag_chunks.jsonl"  # the clean stage's chunks: chunk_id, doc_id, domain, source, text
ORACLE_SHARE = 0.8  # RAFT: training examples whose context holds their source chunk
CHARS_PER_TOKEN = 3.5
MIN_PASSAGE_CHARS = 120
OVERHEAD_TOKENS = 48  # chat-template markers, the context header and instruction, the [n] (source) labels


@dataclass(frozen=True)
class Passage:
    n: int
    source: str
    text: str


def read_chunks(ctx: StageContext, domain: str) -> dict[str, dict[str, str]]:
    """This cycle's cleaned chunks of `domain`, by chunk id (empty when the clean stage wrote none)."""
    try:
        rows = list(iter_jsonl(ctx.store, ctx.bucket, ctx.prefix("clean") + CHUNKS))
    except FileNotFoundError:
        return {}
    return {str(chunk["chunk_id"]): chunk for chunk in rows if chunk.get("domain") == domain}


def passage_budget(question: str, answer: str, count: int, max_seq_length: int) -> int:
    """Characters each of `count` passages may take so system prompt, question, passages and answer fit."""
    left = max_seq_length - OVERHEAD_TOKENS - (len(SYSTEM_PROMPT) + len(question) + len(answer)) / CHARS_PER_TOKEN
    return max(0, int(left * CHARS_PER_TOKEN / max(count, 1)))


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit].rstrip() + " ..."


def context_messages(
    row: Mapping[str, Any],
    chunks: Mapping[str, Mapping[str, str]],
    by_doc: Sequence[str],
    count: int,
    max_seq_length: int,
    seed: int,
    oracle: bool | None,
) -> list[dict[str, str]]:
    """The example's messages with `count` passages: its source chunk (always when `oracle` is True, in
    ORACLE_SHARE of examples when None) among distractors from other documents. Bare when no passages fit, the
    source chunk is unknown or the domain has no other document."""
    messages = list(row["messages"])
    source = chunks.get(str(row.get("source", "")))
    if count <= 0 or source is None:
        return messages
    question, answer = routing_text(messages), str(messages[-1]["content"])
    limit = passage_budget(question, answer, count, max_seq_length)
    if limit < MIN_PASSAGE_CHARS:
        return messages
    rng = random.Random(int(hashlib.sha256(f"{seed}:{row.get('source')}:{question}".encode()).hexdigest()[:16], 16))
    others = [chunk_id for chunk_id in by_doc if chunks[chunk_id]["doc_id"] != source["doc_id"]]
    if not others:
        return messages
    keep_oracle = oracle if oracle is not None else rng.random() < ORACLE_SHARE
    picked = rng.sample(others, min(len(others), count - 1 if keep_oracle else count))
    chosen = [*picked, str(row["source"])] if keep_oracle else picked
    rng.shuffle(chosen)
    passages = [Passage(n, chunks[c]["source"], clip(chunks[c]["text"], limit)) for n, c in enumerate(chosen, 1)]
    return training_messages(question, answer, passages)


def serving_layout(
    ctx: StageContext, domain: str, rows: Sequence[Mapping[str, Any]], oracle: bool | None
) -> list[list[dict[str, str]]]:
    """`rows`' messages in the serving layout with `pipeline.training.contextPassages` passages each (see
    `context_messages`); `oracle` True for evaluation, None (RAFT's share) for training."""
    training = ctx.spec.pipeline.training
    chunks = read_chunks(ctx, domain) if training.context_passages else {}
    ids = sorted(chunks)
    return [
        context_messages(row, chunks, ids, training.context_passages, training.max_seq_length, training.seed, oracle)
        for row in rows
    ]
