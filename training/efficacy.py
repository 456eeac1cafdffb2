"""Learning efficacy: plain-text perplexity of held-out documents, per domain, under the base and under every
expert — the expert x domain matrix. An expert that learned its domain is below the base and below every other
expert on its own domain's documents; one that learned only the chat format moves every domain alike.

Held-out documents are the synth stage's held-out split (`heldout_docs.json`): no stage trains on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from latentmas.training.losses import Example, activate, score
from peft import PeftModel

BASE_ROW = "base"


def document_windows(tokenizer: Any, texts: Sequence[str], window: int, token_budget: int) -> list[Example]:
    """Each document's tokens cut into `window`-token pieces (every token scored, as in language-model
    perplexity), taken round-robin across documents until `token_budget` tokens are collected, so a long document
    cannot crowd out the others."""
    per_doc = []
    for text in texts:
        ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        per_doc.append([ids[start : start + window] for start in range(0, len(ids), window) if start + 1 < len(ids)])
    examples: list[Example] = []
    used = 0
    depth = 0
    while used < token_budget and any(depth < len(pieces) for pieces in per_doc):
        for pieces in per_doc:
            if depth < len(pieces) and used < token_budget:
                piece = pieces[depth]
                examples.append((piece, piece))
                used += len(piece)
        depth += 1
    return examples


def perplexity_matrix(
    model: PeftModel,
    tokenizer: Any,
    documents: Mapping[str, Sequence[str]],
    experts: Sequence[str],
    pad_id: int,
    window: int,
    token_budget: int,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """{row: {domain: {loss, perplexity, tokens}}} for row in base + experts (adapters loaded under their names)."""
    windows = {domain: document_windows(tokenizer, texts, window, token_budget) for domain, texts in documents.items()}
    matrix: dict[str, dict[str, dict[str, float | int]]] = {}
    with model.disable_adapter():
        matrix[BASE_ROW] = {domain: score(model, ex, pad_id).as_dict() for domain, ex in windows.items() if ex}
    for name in experts:
        activate(model, [name])
        matrix[name] = {domain: score(model, ex, pad_id).as_dict() for domain, ex in windows.items() if ex}
    return matrix


def own_domain_verdicts(
    matrix: Mapping[str, Mapping[str, Mapping[str, Any]]], domains: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Per expert (name -> its domain): below the base and below every other expert on its own domain?"""
    verdicts: dict[str, dict[str, Any]] = {}
    for name, domain in domains.items():
        if domain not in matrix.get(name, {}):
            continue
        own = float(matrix[name][domain]["perplexity"])
        others = {row: float(cells[domain]["perplexity"]) for row, cells in matrix.items() if row != name}
        verdicts[name] = {
            "perplexity": own,
            "base": others.get(BASE_ROW),
            "best_other": min((v for r, v in others.items() if r != BASE_ROW), default=None),
            "beats_base": own < others.get(BASE_ROW, float("inf")),
            "beats_others": all(own < v for r, v in others.items() if r != BASE_ROW),
        }
    return verdicts
