"""Retrieval measured on the natural questions: document-level relevance, fusion tuned on one half and
reported on the other, with a bootstrap interval for "hybrid beats the better single engine".

Any chunk of a relevant document is a hit: a ranking is of documents, each scored by its best chunk
(neighbouring chunks of one document count once). nDCG@10 and recall@5 come from ir-measures
(pytrec_eval). The fusion family is `pipeline.rag.fusion`; its parameter (RRF k or the dense weight) is
chosen on the `tune` half; BM25, dense, untuned hybrid (RRF k=60 / weight 0.5) and tuned hybrid are all
scored on the `test` half in the same run.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ir_measures
from ir_measures import R, nDCG
from latentmas.jobs.questions import NaturalQuestion
from latentmas.jobs.retrieval import Fusion, FusionParams, HybridRetriever, Mode

DEPTH = 100  # candidates per engine
RRF_GRID = (60, 1, 2, 5, 10, 20, 40, 100)  # the default first: a tie keeps it
WEIGHT_GRID = (0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9)
NDCG, RECALL = nDCG @ 10, R @ 5
RESAMPLES = 2000


@dataclass(frozen=True)
class Candidates:
    """One question's dense and BM25 candidates (rowid -> score) and the relevant documents present."""

    question: NaturalQuestion
    dense: dict[int, float]
    lexical: dict[int, float]
    relevant: frozenset[str]


def collect(
    retriever: HybridRetriever, questions: Sequence[NaturalQuestion], raw_prefix: str
) -> tuple[list[Candidates], dict[int, str]]:
    """Both engines' candidates per question (questions without a relevant document in the index are
    dropped) and rowid -> doc_id for every candidate."""
    indexed = {row[0] for row in retriever.docs.conn.execute("SELECT DISTINCT doc_id FROM chunks")}
    out = []
    for question in questions:
        relevant = question.relevant_doc_ids(raw_prefix) & indexed
        if relevant:
            dense = retriever.dense_scores(question.question, DEPTH)
            lexical = retriever.bm25_scores(question.question, DEPTH)
            out.append(Candidates(question, dense, lexical, frozenset(relevant)))
    rowids = sorted({r for c in out for r in (*c.dense, *c.lexical)})
    doc_of = {rowid: record.doc_id for rowid, record in retriever.docs.get(rowids).items()}
    return out, doc_of


def document_ranking(fused: Mapping[int, float], doc_of: Mapping[int, str], k: int = 10) -> list[str]:
    """Documents by their best chunk's fused score (ties by doc_id), top k."""
    best: dict[str, float] = {}
    for rowid, score in fused.items():
        doc = doc_of[rowid]
        best[doc] = max(best.get(doc, score), score)
    return sorted(best, key=lambda d: (-best[d], d))[:k]


def per_question(
    items: Sequence[Candidates], doc_of: Mapping[int, str], params: FusionParams, mode: Mode
) -> dict[str, dict[str, float]]:
    """question id -> {"ndcg@10", "recall@5"} for one retrieval mode."""
    qrels = [ir_measures.Qrel(c.question.id, d, 1) for c in items for d in sorted(c.relevant)]
    run: list[ir_measures.ScoredDoc] = []
    for c in items:
        ranking = document_ranking(params.fuse(c.dense, c.lexical, mode), doc_of)
        run.extend(ir_measures.ScoredDoc(c.question.id, d, float(len(ranking) - i)) for i, d in enumerate(ranking))
    scores: dict[str, dict[str, float]] = {c.question.id: {"ndcg@10": 0.0, "recall@5": 0.0} for c in items}
    for metric in ir_measures.iter_calc([NDCG, RECALL], qrels, run):
        scores[metric.query_id]["ndcg@10" if metric.measure == NDCG else "recall@5"] = float(metric.value)
    return scores


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summary(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    rows = list(scores.values())
    return {
        "ndcg@10": round(mean([r["ndcg@10"] for r in rows]), 4),
        "recall@5": round(mean([r["recall@5"] for r in rows]), 4),
        "queries": len(rows),
    }


def grid(fusion: Fusion) -> list[FusionParams]:
    if fusion == "rrf":
        return [FusionParams("rrf", rrf_k=k) for k in RRF_GRID]
    return [FusionParams("weighted", dense_weight=w) for w in WEIGHT_GRID]


def tune(items: Sequence[Candidates], doc_of: Mapping[int, str], fusion: Fusion) -> tuple[FusionParams, float]:
    """The grid point of `fusion` with the best mean nDCG@10 on `items` (the first of equals)."""
    best, best_score = grid(fusion)[0], -1.0
    for params in grid(fusion):
        score = mean([s["ndcg@10"] for s in per_question(items, doc_of, params, "hybrid").values()])
        if score > best_score + 1e-12:
            best, best_score = params, score
    return best, best_score


def paired_bootstrap(a: Sequence[float], b: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over paired questions and its 95% percentile bootstrap interval."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if not diffs:
        return 0.0, 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(mean([diffs[rng.randrange(len(diffs))] for _ in diffs]) for _ in range(RESAMPLES))
    return mean(diffs), means[int(0.025 * RESAMPLES)], means[int(0.975 * RESAMPLES) - 1]


def evaluate_natural(
    retriever: HybridRetriever, questions: Sequence[NaturalQuestion], raw_prefix: str, fusion: Fusion
) -> tuple[FusionParams, dict[str, Any]]:
    """The tuned fusion (the default when no question applies) and the report for the manifest."""
    items, doc_of = collect(retriever, questions, raw_prefix)
    tune_items = [c for c in items if c.question.half == "tune"]
    test_items = [c for c in items if c.question.half == "test"]
    report: dict[str, Any] = {"questions": {"tune": len(tune_items), "test": len(test_items)}, "fusion": fusion}
    if not tune_items or not test_items:
        report["tuned"] = None
        report["reason"] = "no natural question has a relevant document in this index (kept the default fusion)"
        return grid(fusion)[0], report
    tuned, tune_score = tune(tune_items, doc_of, fusion)
    default = grid(fusion)[0]
    test = {
        "bm25": per_question(test_items, doc_of, default, "bm25"),
        "dense": per_question(test_items, doc_of, default, "dense"),
        "hybrid_untuned": per_question(test_items, doc_of, default, "hybrid"),
        "hybrid_tuned": per_question(test_items, doc_of, tuned, "hybrid"),
    }
    ids = [c.question.id for c in test_items]
    table = {name: summary(scores) for name, scores in test.items()}
    baseline = max(("bm25", "dense"), key=lambda name: (table[name]["ndcg@10"], name == "dense"))
    diff, low, high = paired_bootstrap(
        [test["hybrid_tuned"][q]["ndcg@10"] for q in ids], [test[baseline][q]["ndcg@10"] for q in ids]
    )
    domain_of = {c.question.id: c.question.domain for c in test_items}
    domains = sorted(set(domain_of.values()))
    report.update(
        {
            "tuned": {**tuned.as_info(), "tuneNdcg@10": round(tune_score, 4)},
            "test": table,
            "testByDomain": {
                d: {
                    name: summary({q: s for q, s in scores.items() if domain_of[q] == d})
                    for name, scores in test.items()
                }
                for d in domains
            },
            "hybridMinusBest": {
                "baseline": baseline,
                "ndcg@10": round(diff, 4),
                "ci95": [round(low, 4), round(high, 4)],
                "goal": 0.02,
                "met": diff >= 0.02,
            },
        }
    )
    return tuned, report
