"""The synth and index stages on the cleaned subset in MinIO, and the retrieval library."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from latentmas.cycle import StageRun, upstream
from latentmas.jobs.embedding import load_embedder
from latentmas.jobs.outputs import read_parquet
from latentmas.jobs.retrieval import HybridRetriever, fetch_bundle
from latentmas.jobs.synth import sentences
from latentmas.stage import MANIFEST, StageConfig, run_stage
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import DOMAINS, read_jsonl, stage_config, stage_key, written

pytestmark = pytest.mark.data


@pytest.fixture(scope="session")
def synthesized(minio: MinioFixture, cleaned: StageConfig) -> StageConfig:
    if not minio.store.exists("artifacts", stage_key("chain", "quant", MANIFEST)):
        run_stage("quant", cleaned, minio.store)
    run_stage("synth", cleaned, minio.store)
    return cleaned


@pytest.fixture(scope="session")
def indexed(minio: MinioFixture, cleaned: StageConfig) -> dict:
    return run_stage("index", cleaned, minio.store)


def test_synth_writes_chat_examples_per_domain_without_leakage(minio: MinioFixture, synthesized: StageConfig) -> None:
    chunks = {c["chunk_id"]: c for c in read_jsonl(minio.store, stage_key("chain", "clean", "rag_chunks.jsonl"))}
    prompts: dict[str, set[str]] = {"train": set(), "heldout": set()}
    docs: dict[str, set[str]] = {"train": set(), "heldout": set()}
    for domain in DOMAINS:
        for split in ("train", "heldout"):
            rows = read_jsonl(minio.store, stage_key("chain", "synth", f"sft/{domain}/{split}.jsonl"))
            assert rows, f"{domain}/{split} is empty"
            for row in rows:
                roles = [m["role"] for m in row["messages"]]
                assert roles[-2:] == ["user", "assistant"] and row["domain"] == domain
                chunk = chunks[row["source"]]
                assert chunk["domain"] == domain
                flat = " ".join(chunk["text"].split())
                for sentence in sentences(row["messages"][-1]["content"].removesuffix(" ...")):
                    assert sentence in flat, "answer is not grounded in its chunk"
                prompts[split].add(row["messages"][-2]["content"])
                docs[split].add(chunk["doc_id"])
    assert not docs["train"] & docs["heldout"], "a document is in both splits"
    assert not prompts["train"] & prompts["heldout"], "a prompt is in both splits"
    manifest = json.loads(minio.store.get_bytes("artifacts", stage_key("chain", "synth", MANIFEST)))
    assert manifest["counts"]["heldoutDocs"] == len(docs["heldout"])


def test_synth_math_prompts_are_the_problems(minio: MinioFixture, synthesized: StageConfig) -> None:
    rows = read_jsonl(minio.store, stage_key("chain", "synth", "sft/math/train.jsonl"))
    firsts = Counter(r["messages"][1]["content"].split(" ")[0] for r in rows)
    assert firsts.most_common(1)[0][0] in {"Solve", "Find", "Differentiate", "Compute", "Two"}
    assert any(
        r["messages"][2]["content"].startswith("We isolate") or "Answer:" in r["messages"][2]["content"] for r in rows
    )


def test_synth_unreachable_endpoint_is_one_line_error(minio: MinioFixture, synthesized: StageConfig) -> None:
    for stage in ("clean", "quant"):
        for obj in minio.store.list("artifacts", stage_key("chain", stage, "")):
            minio.store.put_bytes(
                "artifacts", obj.key.replace("/chain/", "/endpoint/"), minio.store.get_bytes("artifacts", obj.key)
            )
    config = stage_config(minio.storage, "endpoint", {"synthesis": {"endpoint": "http://127.0.0.1:9"}})
    with pytest.raises(RuntimeError, match=r"synthesis endpoint http://127.0.0.1:9/v1/chat/completions: ConnectError"):
        run_stage("synth", config, minio.store)
    assert not written(minio.store, "endpoint", "synth")


def test_index_bundle_and_retrieval_metrics(minio: MinioFixture, indexed: dict, tmp_path: Path) -> None:
    retrieval = indexed["metrics"]["retrieval"]
    assert set(retrieval) == {"bm25", "dense", "hybrid_rrf", "hybrid_weighted"}
    assert indexed["counts"]["evalQueries"] >= 10
    for scores in retrieval.values():
        assert 0.0 <= scores["ndcg@10"] <= 1.0 and scores["queries"] == indexed["counts"]["evalQueries"]
    assert retrieval["hybrid_rrf"]["recall@5"] >= 0.5, retrieval
    keys = {o["key"] for o in indexed["outputs"]}
    assert {"bundle/index.json", "bundle/faiss.index", "bundle/docs.sqlite"} <= keys
    assert any(k.startswith("bundle/bm25/") for k in keys)
    folder = fetch_bundle(minio.store, "artifacts", stage_key("chain", "index", "bundle/"), tmp_path / "bundle")
    retriever = HybridRetriever.load(folder)
    assert retriever.info["dims"] == 384 and retriever.info["count"] == indexed["counts"]["chunks"]
    assert retriever.info["faiss"] == "flat" and retriever.info["model"] == "all-MiniLM-L6-v2"
    hits = retriever.search("list directory contents", k=5)
    assert hits and hits[0].domain == "linux" and "ls" in hits[0].source
    assert {h.domain for h in retriever.search("derivative of the polynomial at the point", k=3, mode="dense")} == {
        "math"
    }


def _copy_cycle(minio: MinioFixture, stages: tuple[str, ...], cycle: str) -> None:
    """The chain cycle's finished `stages`, copied under another cycle id."""
    for stage in stages:
        for obj in minio.store.list("artifacts", stage_key("chain", stage, "")):
            data = minio.store.get_bytes("artifacts", obj.key)
            minio.store.put_bytes("artifacts", obj.key.replace("/chain/", f"/{cycle}/"), data)


def test_index_with_quality_boost_reads_quant_and_serving_applies_it(
    minio: MinioFixture, synthesized: StageConfig, tmp_path: Path
) -> None:
    config = stage_config(minio.storage, "boost", {"rag": {"qualityBoost": 2.0, "evalQueries": 20}})
    assert [r.id for r in upstream(StageRun("index"), config.spec)] == ["clean", "quant"]
    _copy_cycle(minio, ("clean",), "boost")
    with pytest.raises(RuntimeError, match=r"quant"):  # quant not finished: refused, nothing written
        run_stage("index", config, minio.store)
    assert not written(minio.store, "boost", "index")
    _copy_cycle(minio, ("quant",), "boost")
    manifest = run_stage("index", config, minio.store)
    assert set(manifest["recipe"]["inputs"]) == {"clean", "quant"}, "the boosted index is a function of quant"
    quality = read_parquet(minio.store, "artifacts", stage_key("boost", "quant", "quality.parquet"), None)
    scores = dict(zip(quality.column("doc_id").to_pylist(), quality.column("quality").to_pylist(), strict=True))
    folder = fetch_bundle(minio.store, "artifacts", stage_key("boost", "index", "bundle/"), tmp_path / "bundle")
    retriever = HybridRetriever.load(folder)  # what serving loads
    assert retriever.boost_weight == 2.0 and retriever.boost == pytest.approx(scores)
    plain = HybridRetriever.load(folder)
    plain.set_boost({}, 0.0)
    unboosted = {h.id: h.score for h in plain.search("list directory contents", k=20)}
    for hit in retriever.search("list directory contents", k=20):
        if hit.id in unboosted:
            assert hit.score == pytest.approx(unboosted[hit.id] * (1 + 2.0 * scores[hit.doc_id]))


def test_in_memory_retriever_modes_rerank_and_boost() -> None:
    texts = [
        "The GNU General Public License is a copyleft license for software.",
        "Python lists are mutable sequences that hold references to objects.",
        "The tar command creates and extracts archive files on Linux.",
        "A derivative measures how a function changes as its input changes.",
    ]
    retriever = HybridRetriever.from_texts(texts, ["gpl", "py", "tar", "calc"], load_embedder("all-MiniLM-L6-v2"))
    assert retriever.search("copyleft software license", k=1, mode="bm25")[0].id == "gpl"
    assert retriever.search("how do I make an archive", k=1, mode="dense")[0].id == "tar"
    for fusion in ("rrf", "weighted"):
        assert retriever.search("mutable Python sequences", k=1, fusion=fusion)[0].id == "py"
    retriever.set_reranker(lambda query, hits: sorted(hits, key=lambda h: h.id))
    assert [h.id for h in retriever.search("license archive function", k=4)] == sorted(
        h for h in ["calc", "gpl", "py", "tar"]
    )
    retriever.set_reranker(None)
    plain = {h.id: h.score for h in retriever.search("software license", k=4)}
    retriever.set_boost({"calc": 1.0}, 10.0)
    boosted = {h.id: h.score for h in retriever.search("software license", k=4)}
    assert boosted["calc"] == pytest.approx(plain["calc"] * 11.0) and boosted["gpl"] == plain["gpl"]
