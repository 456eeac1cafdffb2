"""Synthesis answers are grounded in their chunk and never echo their question: the template fallback on the
bundled corpus's text, and the endpoint path's support check (generators passed as plain functions, the HTTP
call apart)."""

from __future__ import annotations

import re
from collections.abc import Callable

from latentmas.jobs.synth import (
    TEMPLATES,
    endpoint_examples,
    normalized,
    parse_pair,
    sentences,
    supported,
    template_examples,
    without_echo,
)
from latentmas.spec import SynthesisSpec

from tests.data.test_questions import corpus_sources

ALL_TEMPLATES = SynthesisSpec(examples_per_chunk=len(TEMPLATES))
CHUNK = {
    "chunk_id": "doc-0000",
    "text": "The tee command copies standard input to standard output. It also writes a copy to every file named. "
    "Use -a to append to the files instead of overwriting them. Without files it acts like cat.",
}


def bundled_chunks(limit: int = 400) -> list[dict[str, str]]:
    """Pieces of the bundled corpus's documents the size of the clean stage's chunks."""
    chunks = []
    for key, text in sorted(corpus_sources().items()):
        for start in range(0, min(len(text), 2400), 800):
            chunks.append({"chunk_id": f"{key}-{start}", "text": text[start : start + 800]})
    return chunks[:: max(1, len(chunks) // limit)]


def test_template_answers_never_repeat_a_sentence_of_their_question() -> None:
    pairs = [pair for chunk in bundled_chunks() for pair in template_examples(chunk, "title", ALL_TEMPLATES)]
    assert len(pairs) > 500
    for question, answer in pairs:
        asked = normalized(question)
        echoed = [part for part in sentences(answer) if normalized(part) in asked]
        assert not echoed, (question, answer)
        quoted = re.search(r'(?:Explain this|passage[^:]*): "(.+)"$', question)
        quote = normalized(quoted.group(1)) if quoted else ""
        assert not (quote and normalized(answer).startswith(quote)), (question, answer)


def test_template_answers_come_from_their_chunk() -> None:
    for chunk in bundled_chunks(150):
        text = normalized(chunk["text"])
        for question, answer in template_examples(chunk, "title", ALL_TEMPLATES):
            first = normalized(sentences(answer.removesuffix(" ..."))[0])
            assert first and first[:60] in text, (question, answer)


def test_explain_answers_with_what_follows_the_quote() -> None:
    pairs = dict(template_examples(CHUNK, "tee", ALL_TEMPLATES))
    explain = next(q for q in pairs if "Explain this" in q)
    assert "copies standard input" in explain
    assert pairs[explain].startswith("It also writes a copy")


def test_without_echo_ignores_case_spacing_and_punctuation() -> None:
    question = 'ls: Explain this: "The  LS command lists files"'
    assert without_echo(question, "The ls command lists files. It sorts them by name.") == "It sorts them by name."
    assert without_echo(question, "the ls command, lists files!") == ""


def test_endpoint_pair_is_kept_when_the_chunk_supports_it() -> None:
    def generate(chunk: str, title: str) -> tuple[str, str]:
        return "How do I keep what is already in the file when using tee?", "Use -a to append to the files."

    pairs, rejected = endpoint_examples(CHUNK, "tee", ALL_TEMPLATES, generate)
    assert not rejected
    assert pairs == [("How do I keep what is already in the file when using tee?", "Use -a to append to the files.")]


def test_unsupported_echoing_or_malformed_endpoint_answers_fall_back_to_templates() -> None:
    replies = {
        "made up": ("What does tee do?", "Tee encrypts network packets with elliptic curves and quantum keys."),
        "echo": (
            "The tee command copies standard input to standard output.",
            "The tee command copies standard input to standard output.",
        ),
        "malformed": parse_pair("Sure! Here is a question about tee."),
        "empty answer": ("What does tee do?", ""),
    }
    for name, reply in replies.items():
        pairs, rejected = endpoint_examples(CHUNK, "tee", ALL_TEMPLATES, replying(reply))
        assert rejected, name
        assert pairs == template_examples(CHUNK, "tee", ALL_TEMPLATES), name


def replying(reply: tuple[str, str]) -> Callable[[str, str], tuple[str, str]]:
    def generate(chunk: str, title: str) -> tuple[str, str]:
        return reply

    return generate


def test_support_is_the_share_of_answer_words_found_in_the_chunk() -> None:
    assert supported("Use -a to append to the files.", CHUNK["text"])
    assert not supported("Use -a to append, then gzip and upload the archive.", CHUNK["text"])
    assert not supported("", CHUNK["text"])


def test_parse_pair_reads_the_json_object_in_a_reply() -> None:
    reply = 'Here you go:\n{"question": "What  does tee do?", "answer": "It copies input."}\nThanks'
    assert parse_pair(reply) == ("What does tee do?", "It copies input.")
    assert parse_pair('["not", "an object"]') == ("", "")
    assert parse_pair("{broken json}") == ("", "")
