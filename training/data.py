"""Reading what the data plane produced: the cleaned corpus and the per-domain SFT chat data.

Contract: clean writes `corpus.parquet` (doc_id, domain, source, text) under its stage prefix (a single
file, or a folder of parquet parts); synth writes `sft/<domain>/{train,heldout}.jsonl`, one
{"messages": [user, assistant], "domain", "source"} object per line."""

from __future__ import annotations

import io
import json
from typing import Any

import polars as pl
from latentmas.stage import StageContext

CORPUS = "corpus.parquet"
SPLITS = ("train", "heldout")


def sft_key(domain: str, split: str) -> str:
    """Object name of a domain's SFT split, relative to the synth stage prefix."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"sft/{domain}/{split}.jsonl"


def parse_sft(text: str, where: str) -> list[dict[str, Any]]:
    """Chat examples from JSONL, each checked to hold a user prompt and an assistant answer."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        roles = [m.get("role") for m in row.get("messages", [])]
        if "user" not in roles or roles[-1] != "assistant":
            raise ValueError(f"{where}:{number}: expected messages with a user turn and a final assistant turn")
        rows.append(row)
    return rows


def read_sft(ctx: StageContext, domain: str, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """One domain's SFT split from this cycle's synth stage (which must have finished)."""
    ctx.read_manifest("synth")
    key = ctx.prefix("synth") + sft_key(domain, split)
    if not ctx.store.exists(ctx.bucket, key):
        raise FileNotFoundError(f"no {split} data for domain {domain!r}: {ctx.bucket}/{key} is missing")
    rows = parse_sft(ctx.store.get_bytes(ctx.bucket, key).decode(), f"{ctx.bucket}/{key}")
    if not rows:
        raise ValueError(f"{ctx.bucket}/{key} holds no examples")
    return rows[:limit] if limit else rows


def document_of(row: dict[str, Any]) -> str:
    """The document an SFT example was written from (its `doc_id`, else its source chunk id `<doc_id>-<nnnn>`):
    the unit evaluation resamples, since examples of one document are not independent."""
    if row.get("doc_id"):
        return str(row["doc_id"])
    source = str(row.get("source", ""))
    head, _, tail = source.rpartition("-")
    return head if head and tail.isdigit() else source


def spread_by_document(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """Up to `limit` rows taken round-robin over their documents (in first-seen order), so a small evaluation
    budget still covers as many documents as it can instead of the first one or two."""
    if not limit or len(rows) <= limit:
        return rows
    queues: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        queues.setdefault(document_of(row), []).append(row)
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < limit:
        picked += [queue[depth] for queue in queues.values() if depth < len(queue)][: limit - len(picked)]
        depth += 1
    return picked


def read_corpus_frame(ctx: StageContext, columns: list[str]) -> pl.DataFrame:
    """`columns` of the cleaned corpus (one parquet file or a folder of parts), sorted by doc_id."""
    ctx.read_manifest("clean")
    base = ctx.prefix("clean") + CORPUS
    if ctx.store.exists(ctx.bucket, base):
        keys = [base]
    else:
        keys = sorted(o.key for o in ctx.store.list(ctx.bucket, base + "/") if o.key.endswith(".parquet"))
    if not keys:
        raise FileNotFoundError(f"no cleaned corpus at {ctx.bucket}/{base}")
    frames = [pl.read_parquet(io.BytesIO(ctx.store.get_bytes(ctx.bucket, key)), columns=columns) for key in keys]
    return pl.concat(frames).sort("doc_id")


def read_corpus_texts(ctx: StageContext, max_chars: int) -> list[str]:
    """Texts of the cleaned corpus (up to `max_chars` in all), in a stable order."""
    texts: list[str] = []
    total = 0
    for text in read_corpus_frame(ctx, ["doc_id", "text"])["text"].to_list():
        if total >= max_chars:
            break
        texts.append(str(text))
        total += len(text)
    return texts
