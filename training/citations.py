"""Answers supported by their citations: on the natural questions' test half, each question is answered on the
single-expert path with RAG (the promoted index's hybrid retrieval, the context layout serving uses, the adapter
of the question's domain), and each answer sentence counts as supported when it cites passages ([n]) and is
close enough to one of them.

The measure is semantic similarity from sentence-transformers with the packaged all-MiniLM-L6-v2 (already the
index's embedder, available offline): a sentence is supported when its cosine similarity to a passage it cites
is at least SUPPORT_THRESHOLD. No NLI cross-encoder is available offline, so this is closeness, not entailment:
it catches answers that cite passages they do not use and uncited sentences, not subtle contradictions."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SUPPORT_THRESHOLD = 0.6
CITATION = re.compile(r"\[(\d+)\]")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
MIN_SENTENCE_CHARS = 12


@dataclass(frozen=True)
class Support:
    sentences: int
    cited: int
    supported: int

    @property
    def share(self) -> float:
        return self.supported / self.sentences if self.sentences else 0.0


def answer_sentences(answer: str) -> list[str]:
    """Sentences worth judging (fragments under MIN_SENTENCE_CHARS, e.g. a lone "[1]", are not)."""
    return [s.strip() for s in SENTENCE.split(answer.strip()) if len(CITATION.sub("", s).strip()) >= MIN_SENTENCE_CHARS]


def support(answer: str, passages: Mapping[int, str], embedder: Any) -> Support:
    """How many of `answer`'s sentences cite a passage ([n] of `passages`) and are similar enough to one."""
    sentences = answer_sentences(answer)
    cited = [[int(n) for n in CITATION.findall(s) if int(n) in passages] for s in sentences]
    judged = [(i, n) for i, numbers in enumerate(cited) for n in numbers]
    if not judged:
        return Support(len(sentences), 0, 0)
    texts = [CITATION.sub("", sentences[i]).strip() for i, _ in judged]
    vectors = np.asarray(embedder.encode(texts + [passages[n] for _, n in judged]), dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = (vectors[: len(judged)] * vectors[len(judged) :]).sum(axis=1)
    supported = {i for (i, _), value in zip(judged, similarity, strict=True) if value >= SUPPORT_THRESHOLD}
    return Support(len(sentences), sum(1 for numbers in cited if numbers), len(supported))


def per_domain(results: Sequence[tuple[str, Support]]) -> dict[str, dict[str, float | int]]:
    """Sentence-level support share per domain (sentences pooled over the domain's answers)."""
    table: dict[str, dict[str, float | int]] = {}
    for domain in sorted({d for d, _ in results}):
        parts = [s for d, s in results if d == domain]
        sentences = sum(p.sentences for p in parts)
        supported = sum(p.supported for p in parts)
        table[domain] = {
            "answers": len(parts),
            "sentences": sentences,
            "cited_sentences": sum(p.cited for p in parts),
            "supported_sentences": supported,
            "supported_share": round(supported / sentences, 4) if sentences else 0.0,
        }
    return table


def measure(
    store: Any, bucket: str, namespace: str, stack: Any, per_domain_questions: int, max_new_tokens: int
) -> dict[str, Any]:
    """Answers up to `per_domain_questions` natural test questions per expert domain with the stack's promoted base,
    the domain's promoted expert and the promoted index (top SNIPPET passages, hybrid retrieval), and measures
    each answer's citation support. Returns the per-domain table, the settings and every answer."""
    import torch
    from latentmas.chat import encode_prompt, end_of_turn_ids, pad_token_id
    from latentmas.jobs.embedding import load_embedder
    from latentmas.jobs.questions import load_natural_questions
    from latentmas.jobs.retrieval import HybridRetriever
    from latentmas.prompts import request_messages, with_context
    from latentmas.registry import load_registry
    from latentmas.services.rag_context import SNIPPET_CHARS
    from latentmas.training.context import Passage
    from latentmas.training.modelstore import cached_folder
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = load_registry(store, bucket, namespace, stack.name)
    base, index = registry.base.active(), registry.index.active()
    if base is None or index is None:
        raise ValueError(f"stack {stack.name}: no promoted base and index yet; run a cycle first")
    experts = {
        e.domain: e.name for e in stack.spec.experts if e.name in registry.experts and registry.experts[e.name].active()
    }
    if not experts:
        raise ValueError(f"stack {stack.name}: no promoted expert yet; run a cycle first")
    base_dir = cached_folder(store, bucket, base.prefix, base.files)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    for number, (domain, name) in enumerate(experts.items()):
        version = registry.experts[name].active()
        assert version is not None
        folder = cached_folder(store, bucket, version.prefix, version.files, kind="adapters")
        model = PeftModel.from_pretrained(model, folder, adapter_name=domain) if number == 0 else model
        if number:
            model.load_adapter(folder, adapter_name=domain)
    embedder = load_embedder()
    retriever = HybridRetriever.load(cached_folder(store, bucket, index.prefix, index.files, kind="index"), embedder)
    stop = end_of_turn_ids(tokenizer, model)
    answers: list[dict[str, Any]] = []
    results: list[tuple[str, Support]] = []
    for domain in experts:
        questions = [q for q in load_natural_questions([domain]) if q.half == "test"][:per_domain_questions]
        model.set_adapter(domain)
        for question in questions:
            hits = retriever.search(question.question, 4)
            passages = [Passage(n, h.source or h.doc_id, h.text[:SNIPPET_CHARS]) for n, h in enumerate(hits, 1)]
            ids = encode_prompt(tokenizer, request_messages(prompt=with_context(question.question, passages)))
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.tensor([ids]),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=pad_token_id(tokenizer),
                )
            answer = str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)).strip()
            measured = support(answer, {p.n: p.text for p in passages}, embedder)
            results.append((domain, measured))
            answers.append(
                {
                    "id": question.id,
                    "domain": domain,
                    "answer": answer,
                    "supported": measured.supported,
                    "sentences": measured.sentences,
                }
            )
    return {
        "measure": f"sentence-transformers all-MiniLM-L6-v2 cosine >= {SUPPORT_THRESHOLD} to a cited passage",
        "path": "single expert (the question's domain) with RAG: promoted index, hybrid search, top 4 passages",
        "questions_per_domain": per_domain_questions,
        "max_new_tokens": max_new_tokens,
        "per_domain": per_domain(results),
        "answers": answers,
    }
