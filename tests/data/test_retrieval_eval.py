"""Retrieval that earns "hybrid": stemmed BM25, fusion tuned on the natural questions' tuning half and
stored with the index, serving that uses the stored fusion, document-level scoring with a bootstrap CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from latentmas.jobs.embedding import load_embedder
from latentmas.jobs.questions import Half, NaturalQuestion
from latentmas.jobs.retrieval import FusionParams, Hit, HybridRetriever, Record, best_per_document
from latentmas.jobs.retrieval_eval import document_ranking, evaluate_natural, paired_bootstrap, tune
from latentmas.jobs.tokens import tokenize
from latentmas.registry import ArtifactVersion, load_registry, save_registry, version_prefix
from latentmas.services.rag_context import RagContext, StackIndex
from latentmas.store import LocalStore, sha256_file

BUCKET, NAMESPACE, STACK = "artifacts", "default", "fusion"
# The query's words are in "manual" (BM25's pick); its meaning is in "mechanic" (the dense pick).
TEXTS = {
    "manual": "Automobile repairs: automobile repair manual, repairs index and repair glossary pages.",
    "mechanic": "A car mechanic fixes broken vehicles and engines in the garage.",
    "poem": "Roses are red and the sky is blue over the quiet sea.",
    "recipe": "Whisk eggs with flour and sugar, then bake the cake for forty minutes.",
}
QUERY = "who can mend my damaged auto? automobile repairs"


@pytest.fixture(scope="module")
def embedder() -> Any:
    return load_embedder("all-MiniLM-L6-v2")


def test_bm25_tokens_are_stemmed_for_english_only() -> None:
    assert tokenize("Listing lists of running processes") == ["list", "list", "run", "process"]
    assert tokenize("Listing lists", version=2) == ["listing", "lists"]
    assert tokenize("naïve Größe Привет") == ["naïve", "grösse", "привет"]


def publish(store: LocalStore, retriever: HybridRetriever, params: FusionParams, workdir: Path) -> int:
    """Saves a bundle with `fusionParams` and promotes it the way promotion does (checksums, registry)."""
    registry = load_registry(store, BUCKET, NAMESPACE, STACK)
    version = registry.index.next_version()
    folder = workdir / f"bundle-v{version}"
    retriever.info["fusionParams"] = params.as_info()
    retriever.save(folder)
    prefix = version_prefix(NAMESPACE, STACK, "index", "main", version)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(BUCKET, prefix + path.relative_to(folder).as_posix(), path)
        files[path.relative_to(folder).as_posix()] = sha256_file(path)
    registry.index.history.append(ArtifactVersion(version=version, prefix=prefix, files=files))
    registry.index.current = version
    save_registry(store, BUCKET, NAMESPACE, STACK, registry)
    return version


def test_serving_uses_the_fusion_stored_with_the_index(tmp_path: Path, embedder: Any) -> None:
    retriever = HybridRetriever.from_texts(list(TEXTS.values()), list(TEXTS), embedder)
    bm25_top = retriever.search(QUERY, 1, mode="bm25")[0].id
    dense_top = retriever.search(QUERY, 1, mode="dense")[0].id
    assert bm25_top != dense_top, "the engines must disagree, else this test proves nothing"
    store = LocalStore(tmp_path / "s3")
    store.ensure_bucket(BUCKET)
    index = StackIndex(store, BUCKET, NAMESPACE, STACK, tmp_path / "cache", embedder, poll_seconds=0)
    rag = RagContext(embedder, index, k=1)
    for weight, expected in ((0.0, bm25_top), (1.0, dense_top)):
        publish(store, retriever, FusionParams("weighted", dense_weight=weight), tmp_path)
        assert rag.retrieve(QUERY)[0].id == expected
        assert index.retriever is not None and index.retriever.fusion == FusionParams("weighted", dense_weight=weight)
    old = HybridRetriever.from_texts(["x"], ["x"], embedder)
    assert old.fusion == FusionParams("rrf", 60, 0.5), "a bundle without fusionParams keeps RRF k=60"


def test_neighbouring_chunks_of_one_document_count_once() -> None:
    hits = [Hit("d1-0", "", 3, "", "d1"), Hit("d1-1", "", 2, "", "d1"), Hit("d2-0", "", 1, "", "d2")]
    assert [h.id for h in best_per_document(hits)] == ["d1-0", "d2-0"]
    assert document_ranking({1: 0.9, 2: 0.95, 3: 0.1}, {1: "a", 2: "a", 3: "b"}) == ["a", "b"]


def test_paired_bootstrap_interval() -> None:
    diff, low, high = paired_bootstrap([1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    assert diff == 0.75 and 0.0 <= low < 0.75 < high <= 1.0
    assert paired_bootstrap([0.5] * 5, [0.5] * 5) == (0.0, 0.0, 0.0)


def question(qid: str, text: str, relevant: str, half: Half) -> NaturalQuestion:
    return NaturalQuestion(qid, text, "cars", (relevant,), half)


def test_tuning_picks_the_fusion_that_wins_on_the_tuning_half(embedder: Any) -> None:
    questions = [
        question("q1", QUERY, "mechanic", "tune"),
        question("q2", "my car engine broke, who can help? repair", "mechanic", "tune"),
        question("q3", "baking a sponge dessert", "recipe", "test"),
        question("q4", "verse about flowers and the ocean", "poem", "test"),
        question("q5", "absent document", "nowhere", "test"),
    ]
    # the records' doc_ids are what the clean stage would give the relevant paths
    hashed = {q.relevant[0]: next(iter(q.relevant_doc_ids())) for q in questions}
    records = [Record(f"{k}-0", t, hashed.get(k, k), "cars", k) for k, t in TEXTS.items()]
    retriever = HybridRetriever.build(records, embedder)
    tuned, report = evaluate_natural(retriever, questions, "", "weighted")
    assert report["questions"] == {"tune": 2, "test": 2}
    assert tuned.fusion == "weighted" and tuned.dense_weight >= 0.5, "dense answers the tuning questions"
    assert set(report["test"]) == {"bm25", "dense", "hybrid_untuned", "hybrid_tuned"}
    assert report["hybridMinusBest"]["baseline"] in ("bm25", "dense")
    low, high = report["hybridMinusBest"]["ci95"]
    assert low <= report["hybridMinusBest"]["ndcg@10"] <= high
    none, empty = evaluate_natural(retriever, questions[4:], "", "rrf")
    assert none == FusionParams() and empty["tuned"] is None and "default fusion" in empty["reason"]
    rrf_params, _ = tune([], {}, "rrf")
    assert rrf_params == FusionParams("rrf", 60)
