"""The bundled natural-question set and its loader: coverage, halves, labels that name real documents."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from latentmas.jobs.cleaning import RawRecord, doc_id_for, parse_object
from latentmas.jobs.corpus import default_corpus_dir
from latentmas.jobs.questions import heldout_questions, load_natural_questions

from tests.data.conftest import DOMAINS

WORDS = re.compile(r"\w+")


def corpus_sources() -> dict[str, str]:
    """source -> text of every document the clean stage's parser finds in the bundled corpus."""
    root = default_corpus_dir()
    out = {}
    for domain in DOMAINS:
        for path in sorted((root / domain).iterdir()):
            key = path.relative_to(root).as_posix()
            for record in parse_object(key, path.read_bytes()):
                if isinstance(record, RawRecord):
                    out[record.source] = record.text
    return out


def test_every_bundled_domain_has_thirty_questions_in_two_halves() -> None:
    questions = load_natural_questions()
    assert sorted({q.domain for q in questions}) == sorted(DOMAINS)
    per_domain = Counter(q.domain for q in questions)
    assert min(per_domain.values()) >= 30, per_domain
    for domain in DOMAINS:
        halves = Counter(q.half for q in questions if q.domain == domain)
        assert abs(halves["tune"] - halves["test"]) <= 1, (domain, halves)
    assert len({q.id for q in questions}) == len(questions)
    assert load_natural_questions(["math", "nowhere"]) == [q for q in questions if q.domain == "math"]


def test_relevant_documents_are_documents_the_clean_stage_names() -> None:
    sources = corpus_sources()
    for question in load_natural_questions():
        for path in question.relevant:
            assert path in sources, f"{question.id}: {path} is not a document of the bundled corpus"
        assert question.relevant_doc_ids() == {doc_id_for(p) for p in question.relevant}
        assert question.relevant_doc_ids("raw/") == {doc_id_for("raw/" + p) for p in question.relevant}


def test_questions_are_not_copied_from_their_documents() -> None:
    """No question shares a run of seven words with a relevant document: written, not extracted (names of
    things, such as a license title or a formula, are shorter)."""
    sources = corpus_sources()

    def grams(text: str) -> set[tuple[str, ...]]:
        words = [w.lower() for w in WORDS.findall(text)]
        return {tuple(words[i : i + 7]) for i in range(len(words) - 6)}

    copied = [q.id for q in load_natural_questions() if any(grams(q.question) & grams(sources[p]) for p in q.relevant)]
    assert not copied


def test_expert_evaluation_keeps_only_questions_answered_by_heldout_documents() -> None:
    questions = [q for q in load_natural_questions(["linux"]) if q.relevant[0].startswith("linux/ls")]
    ls_ids = questions[0].relevant_doc_ids()
    corpus = {doc_id_for("linux/ls.txt"), doc_id_for("linux/grep.txt")}  # the copies were deduplicated
    assert heldout_questions(questions, corpus, {doc_id_for("linux/ls.txt")}) == questions
    assert heldout_questions(questions, corpus, {doc_id_for("linux/grep.txt")}) == []
    assert heldout_questions(questions, {doc_id_for("linux/grep.txt")}, ls_ids) == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ('{"id": "x", "question": "q?", "domain": "math", "relevant": [], "half": "test"}', "'relevant'"),
        ('{"id": "x", "question": "q?", "domain": "math", "relevant": ["a"], "half": "dev"}', "'half'"),
        ('{"id": "x", "question": "", "domain": "math", "relevant": ["a"], "half": "test"}', "'question'"),
        ('{"id": "x", "question": "q?", "domain": "linux", "relevant": ["a"], "half": "test"}', "differs"),
    ],
)
def test_a_bad_question_line_is_refused_in_one_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "math.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_natural_questions(folder=tmp_path)
    assert "\n" not in str(err.value) and "math.jsonl:1" in str(err.value)
