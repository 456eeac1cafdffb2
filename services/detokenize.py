"""Incremental, UTF-8- and special-token-safe detokenising: the one way every endpoint turns generated
token ids into text, streamed or not.

Decoding token by token breaks characters that span tokens (byte-level BPE splits `€` into three
tokens, SentencePiece byte fallback does the same): the tokenizer renders the incomplete sequence as
U+FFFD. Re-decoding the whole output every step fixes that but costs O(n²). This keeps two offsets
into the ids (the prefix-offset algorithm of vLLM/TGI): each step decodes only a short window that
starts one token-group back, so tokenizers that drop or add a leading space per word decode in context,
and releases text only when the window no longer ends in an incomplete character. Special tokens are
skipped. Text held back at the end (a `max_tokens` cut inside a character) is never released, so the
final text is always exactly the concatenation of the streamed deltas."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT = "\ufffd"


class StreamDetokenizer:
    """Feed ids with `push`; it returns the newly complete text (often "") and keeps the total in `text`."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)
        )

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        window = self._decode(self.ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT):
            return ""
        delta = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta


def complete_text(tokenizer: Any, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """The text of `ids` without a trailing incomplete character: what a stream of them would show."""
    stream = StreamDetokenizer(tokenizer, skip_special_tokens)
    for token in ids:
        stream.push(token)
    return stream.text
