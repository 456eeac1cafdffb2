"""BM25 tokenisation, shared by indexing and querying so both see the same words.

Version 3 (current): version 2, then the Snowball English stemmer (PyStemmer) on tokens of ASCII letters
only ("listing", "lists" -> "list"; words of other scripts are left as they are). Version 2: NFKC +
casefold, then runs of letters, marks, digits and `_` of every script; Han, Hiragana and Katakana
(written without spaces) become one token per character. Version 1 (the first bundles, which record no
version) kept only `[a-z0-9_]` after lower-casing. Older versions stay available so an index is queried
the way it was built."""

from __future__ import annotations

import re
import unicodedata

import regex
import Stemmer

TOKENIZER_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, TOKENIZER_VERSION)
_V1 = re.compile(r"[a-z0-9_]+")
_SPACELESS = r"\p{Han}\p{Hiragana}\p{Katakana}"
_WORD = regex.compile(rf"[{_SPACELESS}]|[\p{{L}}\p{{M}}\p{{N}}_--{_SPACELESS}]+", regex.V1)
STOPWORDS = frozenset(
    ["a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have", "how", "i", "if", "in",
     "into", "is", "it", "its", "of", "on", "or", "that", "the", "their", "then", "there", "these", "they", "this",
     "to", "was", "we", "what", "when", "where", "which", "who", "why", "will", "with", "you", "your"]
)  # fmt: skip


def normalize(text: str) -> str:
    """The one normalisation for documents and queries: compatibility forms folded, case folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def tokenize(text: str, version: int = TOKENIZER_VERSION) -> list[str]:
    """Word tokens without English stopwords; `version` is the one the index was built with."""
    if version == 1:
        return [t for t in _V1.findall(text.lower()) if t not in STOPWORDS]
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"index tokenizer version {version} is not supported (known: {SUPPORTED_VERSIONS})")
    words = [t for t in _WORD.findall(normalize(text)) if t not in STOPWORDS]
    return words if version == 2 else [_stem(w) for w in words]


_STEMMER = Stemmer.Stemmer("english")
_ASCII_WORD = re.compile(r"[a-z]+")


def _stem(word: str) -> str:
    return _STEMMER.stemWord(word) if _ASCII_WORD.fullmatch(word) else word
