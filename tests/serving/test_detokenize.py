"""The one streaming detokeniser: characters split across tokens never show as U+FFFD, in deltas or
in the final text, with byte-level and byte-fallback tokenizers; special tokens are skipped."""

from __future__ import annotations

import pytest
from latentmas.services.detokenize import REPLACEMENT, StreamDetokenizer, complete_text
from transformers import PreTrainedTokenizerFast

from tests.serving.bytetok import SPLIT_TEXTS, byte_fallback, byte_level

pytestmark = pytest.mark.serving

TOKENIZERS = {"byte_level": byte_level, "byte_fallback": byte_fallback}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return TOKENIZERS[request.param]()


@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_streamed_deltas_never_hold_a_broken_character(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.replace(" ", ""))  # the tokenizer really splits characters into bytes
    naive = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any(REPLACEMENT in prefix for prefix in naive)  # what decoding each prefix would have streamed
    stream = StreamDetokenizer(tokenizer)
    deltas = [stream.push(token) for token in ids]
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) == stream.text == text
    assert complete_text(tokenizer, ids) == text


@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_a_cut_inside_a_character_leaves_no_replacement_char(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for end in range(len(ids)):
        shown = complete_text(tokenizer, ids[:end])
        assert REPLACEMENT not in shown
        assert text.startswith(shown)  # exactly the complete characters of the cut
        assert len(text[len(shown) :].encode()) <= len(ids) - end + 3  # at most one character held back


def test_special_tokens_are_skipped_mid_stream() -> None:
    tokenizer = byte_level()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    euro = tokenizer("€", add_special_tokens=False)["input_ids"]
    ids = tokenizer("a ", add_special_tokens=False)["input_ids"] + euro[:1] + [end] + euro[1:] + [end]
    stream = StreamDetokenizer(tokenizer)
    deltas = [stream.push(token) for token in ids]
    assert stream.text == "a €" and "".join(deltas) == "a €"
    kept = StreamDetokenizer(tokenizer, skip_special_tokens=False)
    for token in ids[:2]:
        kept.push(token)
    kept.push(end)
    assert kept.text == "a <|im_end|>"


def test_each_step_decodes_a_bounded_window() -> None:
    """Incremental: the work per token does not grow with the output (no quadratic re-decoding)."""
    tokenizer = byte_level()
    decoded: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kwargs: object) -> str:
            decoded.append(len(ids))
            return str(tokenizer.decode(ids, **kwargs))

    stream = StreamDetokenizer(Counting())
    ids = tokenizer("Größe € 中文 " * 200, add_special_tokens=False)["input_ids"]
    for token in ids:
        stream.push(token)
    assert stream.text == "Größe € 中文 " * 200
    assert max(decoded) <= 8  # a window of one character's bytes plus context, never the whole output
