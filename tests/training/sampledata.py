"""A small, realistic two-domain corpus and its SFT chat data, written exactly in the data plane's output
formats (clean: corpus.parquet; synth: sft/<domain>/{train,heldout}.jsonl) through the real stage
contract, so the training stages are tested without waiting for the data plane."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest
from latentmas.stage import STAGES, StageConfig, StageContext, StageResult, run_stage
from latentmas.store import ObjectStore

FINANCE = {
    "entities": [
        "Northwind Capital",
        "Harbor Bancorp",
        "Summit Insurance",
        "Cobalt Asset Management",
        "Riverside Credit Union",
        "Meridian Holdings",
        "Atlas Pension Fund",
        "Granite Securities",
    ],
    "facts": [
        ("reported quarterly revenue of {n} million dollars", "What quarterly revenue did {e} report?"),
        ("raised its dividend to {n} cents per share", "What dividend per share did {e} set?"),
        ("holds a tier one capital ratio of {n} percent", "What is the tier one capital ratio of {e}?"),
        ("issued bonds with a coupon of {n} percent", "What coupon did the bonds issued by {e} carry?"),
        ("cut its operating expenses by {n} percent", "By how much did {e} cut operating expenses?"),
        ("expects net interest margin of {n} percent", "What net interest margin does {e} expect?"),
    ],
    "filler": [
        "Analysts said the balance sheet remains liquid and leverage is moderate.",
        "The board approved the buyback after reviewing cash flow and credit exposure.",
        "Equity investors watched the yield curve and inflation data closely.",
        "The audit committee confirmed the earnings report and loan loss reserves.",
    ],
}
MEDICINE = {
    "entities": [
        "metformin",
        "lisinopril",
        "atorvastatin",
        "amoxicillin",
        "levothyroxine",
        "warfarin",
        "omeprazole",
        "salbutamol",
    ],
    "facts": [
        ("is usually started at {n} milligrams once daily", "What starting dose of {e} is usual?"),
        ("requires kidney function tests every {n} months", "How often are kidney tests needed with {e}?"),
        ("reaches peak plasma concentration after {n} hours", "When does {e} reach peak plasma concentration?"),
        ("causes nausea in about {n} percent of patients", "How many patients get nausea from {e}?"),
        ("should be stopped {n} days before surgery", "When should {e} be stopped before surgery?"),
        ("has an elimination half life of {n} hours", "What is the elimination half life of {e}?"),
    ],
    "filler": [
        "Clinicians should review the patient history and current medication before prescribing.",
        "The nurse recorded blood pressure, heart rate and symptoms at each visit.",
        "Dosage may be adjusted for renal impairment, pregnancy or liver disease.",
        "Patients were advised to report rash, dizziness or shortness of breath.",
    ],
}
DOMAINS: dict[str, dict[str, Any]] = {"finance": FINANCE, "medicine": MEDICINE}
TRAIN_PER_DOMAIN, HELDOUT_PER_DOMAIN, DOCS_PER_DOMAIN = 160, 40, 50
SFT_DOCS = 10  # source documents per split: evaluation resamples documents, not examples


def qa_pairs(domain: str, rng: random.Random, count: int) -> Iterator[tuple[str, str]]:
    """(question, answer) pairs stating one fact about one entity of the domain."""
    table = DOMAINS[domain]
    for _ in range(count):
        entity = rng.choice(table["entities"])
        fact, question = rng.choice(table["facts"])
        number = rng.choice([2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 40])
        yield question.format(e=entity), f"{entity} {fact.format(n=number)}."


def documents(domain: str, rng: random.Random) -> list[str]:
    table = DOMAINS[domain]
    docs = []
    for _ in range(DOCS_PER_DOMAIN):
        sentences = [answer[0].upper() + answer[1:] for _, answer in qa_pairs(domain, rng, 4)]
        sentences += rng.sample(table["filler"], 2)
        rng.shuffle(sentences)
        docs.append(" ".join(sentences))
    return docs


def clean_fixture_stage(ctx: StageContext) -> StageResult:
    """Writes corpus.parquet as the clean stage does."""
    rng = random.Random(7)
    rows = [
        {"doc_id": f"{domain}-{i:04d}", "domain": domain, "source": f"raw/{domain}/doc{i}.txt", "text": text}
        for domain in DOMAINS
        for i, text in enumerate(documents(domain, rng))
    ]
    buffer = io.BytesIO()
    pl.DataFrame(rows).write_parquet(buffer)
    ctx.store.put_bytes(ctx.bucket, ctx.key("corpus.parquet"), buffer.getvalue())
    return StageResult(outputs=["corpus.parquet"], counts={"documents": len(rows)})


def synth_fixture_stage(ctx: StageContext) -> StageResult:
    """Writes sft/<domain>/{train,heldout}.jsonl as the synth stage does."""
    outputs = []
    for index, domain in enumerate(DOMAINS):
        rng = random.Random(100 + index)
        pairs = list(qa_pairs(domain, rng, TRAIN_PER_DOMAIN + HELDOUT_PER_DOMAIN))
        for split, chunk in (("train", pairs[:TRAIN_PER_DOMAIN]), ("heldout", pairs[TRAIN_PER_DOMAIN:])):
            lines = [
                json.dumps(
                    {
                        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                        "domain": domain,
                        "source": f"{domain}-doc{i % SFT_DOCS:02d}-{i // SFT_DOCS:04d}",
                    }
                )
                for i, (q, a) in enumerate(chunk)
            ]
            name = f"sft/{domain}/{split}.jsonl"
            ctx.store.put_bytes(ctx.bucket, ctx.key(name), ("\n".join(lines) + "\n").encode())
            outputs.append(name)
    return StageResult(outputs=outputs, counts={"domains": len(DOMAINS)})


def write_sample_data(config: StageConfig, store: ObjectStore) -> None:
    """Runs the two fixture stages under the real `clean`/`synth` names for this cycle only, then restores
    whatever those names pointed at (the data plane's real stages)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(STAGES, "clean", f"{__name__}:clean_fixture_stage")
        patch.setitem(STAGES, "synth", f"{__name__}:synth_fixture_stage")
        run_stage("clean", config, store)
        run_stage("synth", config, store)


def index_fixture_stage(ctx: StageContext) -> StageResult:
    """Writes a small `bundle/` as the index stage does (promotion only copies and checksums it)."""
    docs = [
        {"chunk_id": f"{d}-{i}", "text": t} for d in DOMAINS for i, t in enumerate(documents(d, random.Random(3))[:5])
    ]
    ctx.store.put_bytes(ctx.bucket, ctx.key("bundle/chunks.jsonl"), "\n".join(map(json.dumps, docs)).encode())
    ctx.put_json("bundle/meta.json", {"chunks": len(docs), "embedding_model": "fixture"})
    return StageResult(outputs=["bundle/chunks.jsonl", "bundle/meta.json"], counts={"chunks": len(docs)})


def write_index_bundle(config: StageConfig, store: ObjectStore) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(STAGES, "index", f"{__name__}:index_fixture_stage")
        run_stage("index", config, store)
