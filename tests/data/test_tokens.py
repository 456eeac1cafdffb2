"""BM25 tokenisation in every script: one normalisation for documents and queries, the tokenizer
version recorded in the bundle, older bundles queried the way they were built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from latentmas.jobs.embedding import load_embedder
from latentmas.jobs.retrieval import HybridRetriever
from latentmas.jobs.tokens import TOKENIZER_VERSION, tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Größe Müller", ["grösse", "müller"]),
        ("GRÖSSE Straße", ["grösse", "strasse"]),
        ("Привет, МИР! Ёлка", ["привет", "мир", "ёлка"]),
        ("Καλημέρα ΚΌΣΜΕ σοφίας ΣΟΦΊΑΣ", ["καλημέρα", "κόσμε", "σοφίασ", "σοφίασ"]),
        ("naïve café", ["naïve", "café"]),
        ("ﬁle ①", ["file", "1"]),  # compatibility forms fold (NFKC)
        ("snake_case x2 the cat", ["snake_case", "x2", "cat"]),
        ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # combining vowel signs stay inside the word
        ("東京の天気", ["東", "京", "の", "天", "気"]),  # no spaces: one token per character
        ("한국어 텍스트", ["한국어", "텍스트"]),
    ],
)
def test_tokens_in_every_script(text: str, tokens: list[str]) -> None:
    assert tokenize(text, version=2) == tokens
    # version 3 stems only words of ASCII letters (English); every other token stays as version 2 has it
    stemmed = tokenize(text)
    assert len(stemmed) == len(tokens)
    assert all(a == b or (b.isascii() and b.isalpha()) for a, b in zip(stemmed, tokens, strict=True))


def test_query_and_document_share_normalisation() -> None:
    # Decomposed (NFD) query against a composed (NFC) document, upper against lower case.
    assert tokenize("GRO\u0308SSE MU\u0308LLER") == tokenize("Größe Müller")
    assert tokenize("ΣΟΦΊΑ") == tokenize("σοφία")


DOCS = {
    "de": "Die Größe der Datei hängt von Herrn Müller ab.",
    "ru": "Утилита выводит список файлов в каталоге.",
    "el": "Η φιλοσοφία της επιστήμης μελετά τη γνώση.",  # noqa: RUF001
    "ja": "東京の天気は晴れです。",
    "en": "The ls command lists the files in a directory.",
}


@pytest.fixture(scope="module")
def retriever() -> HybridRetriever:
    return HybridRetriever.from_texts(list(DOCS.values()), list(DOCS), load_embedder("all-MiniLM-L6-v2"))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("Größe Müller", "de"),
        ("GROSSE muller größe", "de"),
        ("УТИЛИТА каталоге", "ru"),
        ("ΦΙΛΟΣΟΦΊΑ", "el"),
        ("天気", "ja"),
        ("directory", "en"),
    ],
)
def test_bm25_finds_words_of_every_script(retriever: HybridRetriever, query: str, expected: str) -> None:
    hits = retriever.search(query, k=1, mode="bm25")
    assert [h.id for h in hits] == [expected], (query, hits)


def test_bundle_records_tokenizer_and_old_bundles_keep_working(retriever: HybridRetriever, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    retriever.save(folder)
    assert json.loads((folder / "index.json").read_text())["tokenizer"] == TOKENIZER_VERSION
    loaded = HybridRetriever.load(folder, retriever.embedder)
    assert [h.id for h in loaded.search("Müller", k=1, mode="bm25")] == ["de"]

    # A bundle from before the version was recorded is queried with the ASCII tokenizer it was built with.
    info = json.loads((folder / "index.json").read_text())
    del info["tokenizer"]
    (folder / "index.json").write_text(json.dumps(info))
    old = HybridRetriever.load(folder, retriever.embedder)
    assert old.tokenizer_version == 1
    assert [h.id for h in old.search("command", k=1, mode="bm25")] == ["en"]  # the same token in 1 and 3
    info["tokenizer"] = 2  # a version-2 bundle is queried unstemmed: "lists" no longer meets the stem "list"
    (folder / "index.json").write_text(json.dumps(info))
    assert HybridRetriever.load(folder, retriever.embedder).search("lists", k=1, mode="bm25") == []
    assert [h.id for h in loaded.search("listing", k=1, mode="bm25")] == ["en"]  # stems meet in version 3

    info["tokenizer"] = 99
    (folder / "index.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="tokenizer version 99 is not supported") as err:
        HybridRetriever.load(folder, retriever.embedder)
    assert "\n" not in str(err.value)
