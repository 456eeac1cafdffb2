"""The honest-evaluation rules, without a cluster: the domain-specific expert gate on constructed per-document
scores (beats the base but not another expert; an interval that includes 0; a regression; too few documents),
the paired bootstrap, the router-kind choice, the TF-IDF router against scikit-learn, the one routing text of
training and serving, boilerplate stripping and the document spread of evaluation budgets."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from latentmas.prompts import request_messages, routing_text, training_messages, with_context
from latentmas.training.data import document_of, spread_by_document
from latentmas.training.gate import expert_decision, router_choice, router_shape_problems
from latentmas.training.router_data import domain_texts
from latentmas.training.router_model import RouterConfig, RouterMLP, save_router
from latentmas.training.router_tfidf import fit_tfidf_router, load_tfidf_router, save_tfidf_router
from latentmas.training.routers import load_any_router, router_kind
from latentmas.training.significance import loss_interval, relative_gain

pytestmark = pytest.mark.training


def documents(losses: list[float], tokens: int = 50) -> dict[str, tuple[float, int]]:
    """Per-document (summed NLL, tokens) with the given mean losses."""
    return {f"doc{i}": (loss * tokens, tokens) for i, loss in enumerate(losses)}


def noisy(mean: float, spread: float, n: int = 12, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [mean + rng.uniform(-spread, spread) for _ in range(n)]


def entry(own: list[float], base: list[float], others: dict[str, list[float]]) -> dict[str, object]:
    """An evaluation entry as the evaluate stage writes it, from per-document losses."""
    mine = documents(own)
    comparisons = {"base": relative_gain(documents(base), mine).as_dict()}
    comparisons.update({name: relative_gain(documents(losses), mine).as_dict() for name, losses in others.items()})
    return {"comparisons": comparisons, "vs_promoted": None}


def test_gain_is_paired_over_documents_with_an_interval() -> None:
    base = documents(noisy(3.0, 1.0))
    better = {doc: (nll * 0.8, tokens) for doc, (nll, tokens) in base.items()}
    gain = relative_gain(base, better)
    assert gain.gain == pytest.approx(0.2) and gain.low == pytest.approx(0.2) and gain.high == pytest.approx(0.2), (
        "a uniform 20% gain on every document is certain, however different the documents are"
    )
    mixed = {doc: (nll * (0.7 if i % 2 else 1.25), t) for i, (doc, (nll, t)) in enumerate(base.items())}
    uncertain = relative_gain(base, mixed)
    assert uncertain.low < 0 < uncertain.high and uncertain.documents == 12
    low, high = loss_interval(base)
    assert low < 3.0 < high
    with pytest.raises(ValueError, match="no document was scored by both"):
        relative_gain(base, {"other": (1.0, 1)})


def test_gate_refuses_an_expert_that_beats_the_base_but_not_another_expert() -> None:
    """Constructed: every expert learned the answer format (all far below the base); `b` is as good on `a`'s
    domain as `a` itself, so `a` shows no domain-specific gain."""
    base, own = noisy(4.0, 0.3), noisy(2.0, 0.3, seed=1)
    format_only = entry(own, base, {"b": [x + 0.01 for x in own], "c": noisy(2.5, 0.3, seed=2)})
    decision = expert_decision(format_only, 0.01)
    assert not decision.promote
    assert "gain over expert b" in decision.reason and ("margin" in decision.reason or "includes 0" in decision.reason)
    specific = entry(own, base, {"b": noisy(2.6, 0.3, seed=3), "c": noisy(2.5, 0.3, seed=2)})
    passed = expert_decision(specific, 0.01)
    assert passed.promote and "beats the base by" in passed.reason and "closest:" in passed.reason


def test_gate_refuses_a_gain_whose_interval_includes_zero() -> None:
    """A mean gain above the margin carried by a few documents: the interval over documents includes 0."""
    base = noisy(3.0, 0.2)
    own = [x * (0.5 if i < 2 else 1.02) for i, x in enumerate(base)]  # two documents improve a lot, ten get worse
    shaky = entry(own, base, {})
    gain = shaky["comparisons"]["base"]
    assert gain["gain"] > 0.05 and gain["low"] < 0 < gain["high"]
    decision = expert_decision(shaky, 0.01)
    assert not decision.promote and "the interval includes 0" in decision.reason and "the base" in decision.reason


def test_gate_margin_regression_and_document_count() -> None:
    base = noisy(3.0, 0.2)
    slight = entry([x * 0.995 for x in base], base, {})
    refused = expert_decision(slight, 0.01)
    assert not refused.promote and "below the 1.00% margin" in refused.reason
    assert expert_decision(slight, 0.0).promote, "a certain 0.5% gain passes a zero margin"
    good = entry([x * 0.8 for x in base], base, {})
    good["vs_promoted"] = {"version": 3, "gain": -0.02, "low": -0.03, "high": -0.01, "documents": 12}
    regressed = expert_decision(good, 0.01)
    assert not regressed.promote and "regresses against promoted v3" in regressed.reason
    few = entry([2.0, 2.1], [3.0, 3.1], {})
    assert "only 2 held-out document(s)" in expert_decision(few, 0.01).reason
    assert "no per-document comparison" in expert_decision({"expert": {"loss": 1.0}}, 0.01).reason


def test_router_kind_with_the_better_natural_accuracy_is_chosen() -> None:
    kinds = {
        "mlp": {"heldout": {"accuracy": 0.98}, "natural": {"accuracy": 0.55}},
        "tfidf-lr": {"heldout": {"accuracy": 0.9}, "natural": {"accuracy": 0.8}},
    }
    choice = router_choice(kinds)
    assert (choice.kind, choice.accuracy, choice.measured_on) == ("tfidf-lr", 0.8, "natural")
    assert "natural questions" in choice.reason and "mlp 0.5500" in choice.reason
    without = router_choice({k: {"heldout": v["heldout"]} for k, v in kinds.items()})
    assert (without.kind, without.measured_on) == ("mlp", "heldout") and "no natural set" in without.reason


@dataclass(frozen=True)
class Passage:
    n: int
    source: str
    text: str


def test_router_reads_the_question_not_the_context_or_system_prompt() -> None:
    question = "How do I list open ports on Linux?"
    sources = [Passage(1, "man/ss.txt", "ss dumps socket statistics."), Passage(2, "py/json.txt", "json encodes.")]
    served = request_messages([{"role": "user", "content": with_context(question, sources)}])
    assert routing_text(served) == question
    assert routing_text(training_messages(question, "Use ss -l.", sources)) == question
    assert routing_text(request_messages(prompt=question)) == question
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *served]
    assert routing_text(chat) == question, "the last user question routes, not earlier turns"
    with pytest.raises(ValueError, match="needs a user turn"):
        routing_text([{"role": "system", "content": "x"}])


def _reference_features(texts: list[str], probe: list[str]) -> tuple[Any, Any]:
    """The word and character TfidfVectorizer blocks side by side, fitted on `texts`: (train, probe) matrices."""
    from latentmas.training.router_tfidf import CHAR_VECTORIZER, VECTORIZER
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    blocks = [TfidfVectorizer(**VECTORIZER).fit(texts), TfidfVectorizer(**CHAR_VECTORIZER).fit(texts)]
    return hstack([b.transform(texts) for b in blocks]).tocsr(), hstack([b.transform(probe) for b in blocks]).tocsr()


def test_tfidf_router_matches_scikit_learn_and_round_trips_without_pickle(tmp_path: Path) -> None:
    from latentmas.training.router_tfidf import C
    from sklearn.linear_model import LogisticRegression

    texts = [
        "how do I parse json in python",
        "python list comprehension syntax",
        "dump a dict to a json file with indentation",
        "which signal kills a process",
        "show disk usage of a directory",
        "list open network ports with ss",
        "may I redistribute GPL code in a closed product",
        "what does the MIT license require",
        "is attribution needed under the apache license",
    ]
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    weights = [1.0, 1.0, 10.0, 1.0, 10.0, 1.0, 1.0, 1.0, 10.0]
    experts = ["python", "linux", "licenses"]
    router = fit_tfidf_router(texts, labels, experts, temperature=1.0, seed=0, weights=weights)
    probe = ["json indentation in python", "kill a process by signal", "GPL redistribution", "unseen words only"]
    train, probed = _reference_features(texts, probe)
    assert np.allclose(router.features(probe), probed.toarray())
    reference = LogisticRegression(C=C, max_iter=3000, random_state=0).fit(train, labels, sample_weight=weights)
    save_tfidf_router(tmp_path / "tfidf", router)
    loaded = load_any_router(tmp_path / "tfidf")
    assert loaded.kind == "tfidf-lr" and loaded.experts == experts
    gates = loaded.gates(torch.nn.Linear(1, 1), None, probe)
    assert np.allclose(gates.numpy(), reference.predict_proba(probed), atol=1e-5)
    assert gates[:3].argmax(dim=-1).tolist() == [0, 1, 2]
    assert "safetensors" not in (tmp_path / "tfidf" / "router.json").read_text()
    assert router_shape_problems(json.loads((tmp_path / "tfidf" / "router.json").read_text()), 64, 2, experts) == []
    config = json.loads((tmp_path / "tfidf" / "router.json").read_text())
    for field in ("vectorizer", "char_vectorizer"):
        (tmp_path / "tfidf" / "router.json").write_text(json.dumps({**config, field: {**config[field], "min_df": 2}}))
        with pytest.raises(ValueError, match=f"{field} settings"):
            load_tfidf_router(tmp_path / "tfidf")
    binary = fit_tfidf_router(texts[:6], labels[:6], experts[:2], temperature=1.0, seed=0)
    two = LogisticRegression(C=C, max_iter=3000, random_state=0)
    fitted, probed_two = _reference_features(texts[:6], probe)
    two.fit(fitted, labels[:6])
    binary_gates = torch.softmax(binary.logits(probe), dim=-1).numpy()
    assert np.allclose(binary_gates, two.predict_proba(probed_two), atol=1e-5)


def test_a_tfidf_router_saved_before_the_character_block_reads_as_words_only(tmp_path: Path) -> None:
    from latentmas.training.router_tfidf import VECTORIZER
    from safetensors.torch import load_file, save_file
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = ["parse json in python", "python dict to json", "kill a process", "list open ports"]
    router = fit_tfidf_router(texts, [0, 0, 1, 1], ["python", "linux"], 1.0, seed=0)
    save_tfidf_router(tmp_path, router)
    config = json.loads((tmp_path / "router.json").read_text())
    del config["char_vectorizer"], config["char_vocabulary"]
    (tmp_path / "router.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "router.safetensors"))
    words = len(config["vocabulary"])
    tensors = {**tensors, "coef": tensors["coef"][:, :words].contiguous()}
    save_file({k: tensors[k] for k in ("idf", "coef", "intercept")}, str(tmp_path / "router.safetensors"))
    old = load_tfidf_router(tmp_path)
    assert old.char_vocabulary is None
    probe = ["json please", "kill it"]
    assert np.allclose(old.features(probe), TfidfVectorizer(**VECTORIZER).fit(texts).transform(probe).toarray())
    assert old.logits(probe).shape == (2, 2)


def test_a_router_folder_without_a_kind_reads_as_the_mlp(tmp_path: Path) -> None:
    config = RouterConfig(experts=["a", "b"], feature_layer=1, temperature=1.0, hidden=4, input_dim=8)
    save_router(tmp_path, RouterMLP(8, 4, 2), config)
    assert json.loads((tmp_path / "router.json").read_text())["kind"] == "mlp"
    old = json.loads((tmp_path / "router.json").read_text())
    del old["kind"]
    (tmp_path / "router.json").write_text(json.dumps(old))
    assert router_kind(tmp_path) == "mlp" and load_any_router(tmp_path).mlp is not None
    (tmp_path / "router.json").write_text(json.dumps({**old, "kind": "forest"}))
    with pytest.raises(ValueError, match="unknown kind 'forest'"):
        router_kind(tmp_path)


def test_boilerplate_is_stripped_and_the_question_kept() -> None:
    header = "Python Library Documentation"
    texts = [f'{header}: Explain this: "{topic} is handy."' for topic in ("json", "re", "os", "sys", "csv")]
    texts.append("How do I sort a dict by value?")
    stripped = domain_texts(texts)
    assert all(header not in text and "Explain this" not in text for text in stripped)
    assert stripped[0] == "json is handy." and stripped[-1] == texts[-1]
    assert domain_texts([f"{header}: Explain this"] * 4) == [f"{header}: Explain this"] * 4, "never left empty"


def test_evaluation_budget_spreads_over_documents() -> None:
    rows = [{"source": f"doc{d}-{i:04d}"} for d in range(4) for i in range(5)]
    assert document_of(rows[6]) == "doc1" and document_of({"doc_id": "x", "source": "y-0001"}) == "x"
    picked = spread_by_document(rows, 6)
    assert [document_of(r) for r in picked] == ["doc0", "doc1", "doc2", "doc3", "doc0", "doc1"]
    assert spread_by_document(rows, None) == rows and spread_by_document(rows, 50) == rows


def test_serving_runtime_serves_a_tfidf_router_on_the_routing_text(tmp_path: Path) -> None:
    from latentmas.services.routing import RouterRuntime, decide

    texts = ["parse json in python", "python dict to json", "kill a process", "list open ports"]
    save_tfidf_router(tmp_path, fit_tfidf_router(texts, [0, 0, 1, 1], ["python", "linux"], 1.0, seed=0))
    runtime = RouterRuntime(tmp_path, 3, torch.device("cpu"))
    question = "how to parse json"
    served = request_messages([{"role": "user", "content": with_context(question, [Passage(1, "s", "kill ports")])}])
    gates = runtime.gates(torch.nn.Linear(1, 1), None, routing_text(served), 1.0)
    assert runtime.kind == "tfidf-lr" and max(gates, key=lambda k: gates[k]) == "python", gates
    assert decide(gates, "top1", 0.3, {"python", "linux"}).experts[0][0] == "python"


def test_sft_examples_carry_their_source_among_distractors_in_the_serving_layout() -> None:
    from latentmas.training.context import MIN_PASSAGE_CHARS, context_messages

    chunks = {
        f"d{d}-{c:04d}": {"doc_id": f"d{d}", "source": f"raw/d{d}.txt", "text": f"Document {d} part {c}. " * 12}
        for d in range(6)
        for c in range(3)
    }
    ids = sorted(chunks)
    rows = [
        {
            "messages": training_messages(f"Question {i} on part {i % 3} of document {i % 6}?", f"Part {i % 3} of it."),
            "source": f"d{i % 6}-{i % 3:04d}",
        }
        for i in range(200)
    ]
    with_source = 0
    for row in rows:
        messages = context_messages(row, chunks, ids, 3, 512, seed=0, oracle=None)
        user = messages[-2]["content"]
        assert routing_text(messages) == routing_text(row["messages"]) and messages[-1] == row["messages"][-1]
        assert user.startswith("Context:\n[1] (raw/") and user.count("] (raw/") == 3
        assert len(user) < 512 * 3.5, "the passages are clipped to what the sequence length leaves"
        own = chunks[row["source"]]["source"]
        with_source += f"({own}) {chunks[row['source']]['text'][:20]}" in user
        assert user.count(f"({own})") <= 1, "distractors come from other documents"
    assert 0.7 < with_source / len(rows) < 0.9, "RAFT: most, not all, training contexts hold the source"
    for row in rows[:20]:
        evaluation = context_messages(row, chunks, ids, 3, 512, seed=0, oracle=True)[-2]["content"]
        assert f"({chunks[row['source']]['source']})" in evaluation, "evaluation always shows the source"
    assert context_messages(rows[0], chunks, ids, 3, 96, seed=0, oracle=True) == rows[0]["messages"], (
        f"under {MIN_PASSAGE_CHARS} characters a passage the example stays bare"
    )
    assert context_messages(rows[0], chunks, ids, 0, 512, seed=0, oracle=True) == rows[0]["messages"]
    assert context_messages({**rows[0], "source": "unknown"}, chunks, ids, 3, 512, 0, True) == rows[0]["messages"]


def test_citation_support_counts_sentences_close_to_a_passage_they_cite() -> None:
    from latentmas.jobs.embedding import load_embedder
    from latentmas.training.citations import answer_sentences, per_domain, support

    passages = {
        1: "The json module's dumps function serialises a Python object to a JSON formatted string.",
        2: "The GNU General Public License requires that modified versions be distributed under the same license.",
    }
    answer = (
        "Use json.dumps to serialise a Python object to a JSON string [1]. "
        "Modified versions must be distributed under the same license [2]. "
        "Penguins live mostly in the southern hemisphere [1]. "
        "You can also indent the output for readability. [3]"
    )
    assert len(answer_sentences(answer)) == 4 and answer_sentences("[1]") == []
    measured = support(answer, passages, load_embedder())
    assert (measured.sentences, measured.cited, measured.supported) == (4, 3, 2), measured
    assert measured.share == 0.5
    assert support("No citation at all here.", passages, None).supported == 0, "nothing cited: nothing to embed"
    table = per_domain([("python", measured), ("python", support("", passages, None))])
    assert table["python"] == {
        "answers": 2,
        "sentences": 4,
        "cited_sentences": 3,
        "supported_sentences": 2,
        "supported_share": 0.5,
    }


def test_report_shows_the_matrix_with_intervals_both_routers_and_the_gate(tmp_path: Path) -> None:
    from latentmas.report import CycleFacts, write_report

    cell = {"loss": 2.0, "perplexity": 7.39, "tokens": 300, "documents": 5, "loss_low": 1.8, "loss_high": 2.2}
    gain = {"gain": 0.1, "low": 0.05, "high": 0.15, "documents": 5}
    entry = {
        "base": cell,
        "expert": cell,
        "served": {**cell, "routed_to": {"a": 8}},
        "comparisons": {"base": gain, "b": gain},
    }
    kind = {
        "heldout": {"accuracy": 1.0, "examples": 16, "confusion": [[8, 0], [0, 8]]},
        "natural": {"accuracy": 0.75, "examples": 8, "confusion": [[3, 1], [1, 3]]},
    }
    facts = CycleFacts(
        "c9",
        {"experts": {"a": entry, "b": entry}, "answer_loss_matrix": {"base": {"x": cell, "y": cell}, "a": {"x": cell}}},
        {"experts": ["a", "b"], "kinds": {"mlp": kind, "tfidf-lr": kind}, "choice": {"kind": "mlp", "reason": "r"}},
        {"natural.test.ndcg@10": 0.5},
        {"evaluate": 3.0},
        {"decisions": {"a": {"promoted": True, "version": 2, "reason": "beats | all"}, "b": {"promoted": False}}},
    )
    citations = {
        "path": "p",
        "measure": "m",
        "questions_per_domain": 2,
        "max_new_tokens": 8,
        "per_domain": {
            "x": {
                "answers": 2,
                "sentences": 4,
                "cited_sentences": 3,
                "supported_sentences": 2,
                "supported_share": 0.5,
            }
        },
    }
    text = write_report(facts, None, tmp_path / "report.md", citations).read_text()
    assert (
        "| base | 2.000 [1.800, 2.200] | 2.000 [1.800, 2.200] |" in text and "| a | 2.000 [1.800, 2.200] | - |" in text
    )
    assert "| mlp | 75.0% of 8 | 100.0% of 16 |" in text and "| tfidf-lr | 75.0% of 8 |" in text
    assert text.count("| true \\ routed | a | b |") == 2 and "Held-out top-1 accuracy: **100.0%**" in text
    assert "| a | yes (v2) | beats / all |" in text and "| b | no |" in text
    assert "| x | 2 | 4 | 3 | 2 | 50.0% |" in text and text.index("supported by their citations") < text.index(
        "## Retrieval"
    )
    assert "nan" not in text


def test_served_routes_equal_to_a_matrix_row_reuse_its_scores() -> None:
    from latentmas.services.routing import RouteDecision
    from latentmas.training.evaluate import reused_row, served_scores
    from latentmas.training.losses import Score

    assert reused_row(()) == "base" and reused_row((("linux", 1.0),)) == "linux"
    assert reused_row((("linux", 0.7), ("python", 0.3))) is None and reused_row((("linux", 0.5),)) is None
    known = {"base": [Score(4.0, 2), Score(6.0, 3)], "linux": [Score(1.0, 2), Score(2.0, 3)]}
    decisions = [RouteDecision([("linux", 1.0)], 0.9, "router"), RouteDecision([], 0.3, "low_confidence")]
    served = served_scores(None, [([1], [1]), ([2], [2])], ["d0", "d1"], decisions, 0, known)
    assert served["documents"] == {"d0": (1.0, 2), "d1": (6.0, 3)}, "the model (None here) was never called"
    assert served["routed_to"] == {"linux": 1, "base (low_confidence)": 1}


def test_router_training_weighs_natural_tune_questions_and_never_sees_the_test_half() -> None:
    from latentmas.spec import ExpertSpec
    from latentmas.training.router_data import NATURAL_WEIGHT, natural_questions, training_weights

    experts = [ExpertSpec(name=d, domain=d) for d in ("python", "linux", "licenses", "math")]
    tune, test = natural_questions(experts, "tune"), natural_questions(experts, "test")
    assert tune[0] and test[0] and not set(tune[0]) & set(test[0])
    assert training_weights(3, 2) == [1.0, 1.0, 1.0, NATURAL_WEIGHT, NATURAL_WEIGHT] and NATURAL_WEIGHT > 1
