"""Paraphrase-style questions about documents: what a user would ask, not words lifted from one chunk.

With `pipeline.synthesis.endpoint` an OpenAI-compatible model writes the question in its own words; a
question that shares a run of `COPY_RUN` words with its chunk is rejected and the template is used
instead. The template fallback names the document's topic (its title: a module, a command, a license
name) inside a per-domain user intent and never contains a sentence of the chunk. The synth stage writes
one question per document of each split (`questions/<domain>/<split>.jsonl`), with the document as its
relevant answer: the held-out ones for evaluation, the train ones for router training data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from typing import Any

COPY_RUN = 5
WORD = re.compile(r"\w+")
INTENTS: dict[str, tuple[str, ...]] = {
    "python": (
        "How would I use {topic} in my Python code?",
        "What problem does {topic} solve, and when should I reach for it?",
        "Can you show me the main things I can do with {topic}?",
        "I keep hearing about {topic} - what is it good for?",
    ),
    "linux": (
        "How do I use {topic} on the command line?",
        "What does {topic} do, and which options matter most?",
        "When would I run {topic} instead of something else?",
        "Can you walk me through a typical {topic} invocation?",
    ),
    "licenses": (
        "What am I allowed to do with software under {topic}?",
        "What obligations come with {topic} if I ship it in a product?",
        "Is {topic} permissive or copyleft, and what does that mean for me?",
        "What do I need to keep or include when I redistribute under {topic}?",
    ),
    "math": (
        "How do I work out a {topic} problem step by step?",
        "What is the method for solving a {topic} question?",
        "Can you explain how to approach {topic}?",
    ),
}
FALLBACK_TOPIC = {"python": "this module", "linux": "this command", "licenses": "this license", "math": "math"}
GENERIC = ("What should I know about {topic}?", "Can you explain {topic} to me?", "How does {topic} work?")
Generator = Callable[[str, str], str]  # (chunk text, title) -> question


def runs(text: str, size: int = COPY_RUN) -> set[tuple[str, ...]]:
    words = [w.lower() for w in WORD.findall(text)]
    return {tuple(words[i : i + size]) for i in range(len(words) - size + 1)}


def copies_chunk(question: str, chunk: str) -> bool:
    """True when the question repeats `COPY_RUN` consecutive words of the chunk."""
    return bool(runs(question) & runs(chunk))


def topic_of(title: str, domain: str) -> str:
    """A short topic for the question: the title without pydoc/man boilerplate, at most six words."""
    cleaned = re.sub(r"(?i)\b(help on module|python library documentation|module|user commands|manual)\b", " ", title)
    cleaned = re.sub(r"\([^)]*\)|[:=_#*`]+", " ", cleaned)
    words: list[str] = []
    for word in cleaned.split():
        if word.lower() not in (w.lower() for w in words):
            words.append(word.lower() if domain == "math" else word)
    return " ".join(words[:6]) if words else FALLBACK_TOPIC.get(domain, f"this {domain} topic")


def template_question(chunk: str, title: str, domain: str, key: str, seed: int = 0) -> str:
    """A user-style question about the document's topic, chosen by a hash of `key`; never echoes the chunk
    (a title long enough to do so is shortened until it does not)."""
    options = INTENTS.get(domain, GENERIC)
    pattern = options[random.Random(f"{seed}:{key}").randrange(len(options))]
    words = topic_of(title, domain).split()
    while True:
        question = pattern.format(topic=" ".join(words) or FALLBACK_TOPIC.get(domain, f"this {domain} topic"))
        if not copies_chunk(question, chunk) or not words:
            return question
        words = words[:-1]


def endpoint_generator(endpoint: str, model: str) -> Generator:
    """Questions written by an OpenAI-compatible chat endpoint, asked not to quote the passage."""
    import httpx

    url = endpoint.rstrip("/") + (
        "/chat/completions" if endpoint.rstrip("/").endswith("/v1") else "/v1/chat/completions"
    )
    system = (
        "You write one question that a user might ask and that the passage answers. Use your own words: do not "
        "quote or copy phrases from the passage. Reply with the question only."
    )

    def generate(chunk: str, title: str) -> str:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"{title}\n\n{chunk}"}],
            "max_tokens": 64,
            "temperature": 0.7,
        }
        try:
            response = httpx.post(url, json=body, timeout=60)
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"]).strip()
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            detail = str(err).splitlines()[0] if str(err) else ""
            raise RuntimeError(f"synthesis endpoint {url}: {type(err).__name__}: {detail}") from err

    return generate


def paraphrase_question(
    chunk: str, title: str, domain: str, key: str, generator: Generator | None, seed: int = 0
) -> tuple[str, str]:
    """(question, method): the generator's question unless it is empty or copies the chunk, else the template."""
    if generator is not None:
        question = " ".join(generator(chunk, title).split())
        if question and not copies_chunk(question, chunk):
            return question, "endpoint"
    return template_question(chunk, title, domain, key, seed), "template"


def document_questions(
    first_chunks: Mapping[str, Mapping[str, str]],
    titles: Mapping[str, str],
    splits: Mapping[str, str],
    generator: Generator | None,
    seed: int = 0,
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(domain, split) -> one question per document (from its first chunk), relevant = that document."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for doc_id, chunk in sorted(first_chunks.items()):
        split = splits.get(doc_id)
        if split not in ("train", "heldout"):
            continue
        question, method = paraphrase_question(
            chunk["text"], titles.get(doc_id, ""), chunk["domain"], doc_id, generator, seed
        )
        row = {"id": f"gen-{doc_id}", "question": question, "domain": chunk["domain"], "relevant": [chunk["source"]],
               "doc_id": doc_id, "method": method}  # fmt: skip
        out.setdefault((chunk["domain"], split), []).append(row)
    return out
