"""Paraphrase-style questions: a generator's question is used unless it copies its chunk; the template
fallback never echoes the chunk; the synth stage writes one question per document and split."""

from __future__ import annotations

import json

from latentmas.jobs.cleaning import heading
from latentmas.jobs.paraphrase import copies_chunk, paraphrase_question, template_question
from latentmas.stage import StageConfig
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import DOMAINS, read_jsonl, stage_key
from tests.data.test_questions import corpus_sources
from tests.data.test_synth_index import synthesized  # noqa: F401  (the session's synth run)


def test_the_template_never_echoes_the_chunk_even_when_the_title_is_its_first_sentence() -> None:
    for key, text in corpus_sources().items():
        domain, chunk = key.split("/")[0], text[:1200]
        for title in (heading(text), " ".join(chunk.split()[:12])):
            question = template_question(chunk, title, domain, key)
            assert question.endswith("?") and not copies_chunk(question, chunk), (key, question)


def test_a_generated_question_that_copies_its_chunk_falls_back_to_the_template() -> None:
    chunk = "The tee command copies standard input to each file and also to standard output."
    copying = paraphrase_question(
        chunk, "tee", "linux", "k", lambda text, title: "tee copies standard input to each file?"
    )
    assert copying[1] == "template" and not copies_chunk(copying[0], chunk)
    own = paraphrase_question(chunk, "tee", "linux", "k", lambda text, title: "How can I log output while watching it?")
    assert own == ("How can I log output while watching it?", "endpoint")
    assert paraphrase_question(chunk, "tee", "linux", "k", lambda text, title: "  ")[1] == "template"


def test_synth_writes_one_question_per_document_and_split(minio: MinioFixture, synthesized: StageConfig) -> None:  # noqa: F811
    chunks = read_jsonl(minio.store, stage_key("chain", "clean", "rag_chunks.jsonl"))
    first: dict[str, dict] = {}
    for chunk in chunks:
        first.setdefault(chunk["doc_id"], chunk)
    heldout = json.loads(minio.store.get_bytes("artifacts", stage_key("chain", "synth", "heldout_docs.json")))
    seen = set()
    for domain in DOMAINS:
        for split in ("train", "heldout"):
            for row in read_jsonl(minio.store, stage_key("chain", "synth", f"questions/{domain}/{split}.jsonl")):
                chunk = first[row["doc_id"]]
                assert row["domain"] == domain and row["relevant"] == [chunk["source"]] and row["method"] == "template"
                assert not copies_chunk(row["question"], chunk["text"])
                seen.add((row["doc_id"], split))
    held = {d for ids in heldout.values() for d in ids}
    assert held and {d for d, s in seen if s == "heldout"} == held
    assert len({d for d, _ in seen}) == len(seen), "a document has questions in both splits"
