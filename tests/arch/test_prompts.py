"""The shared prompt builder and the fallback for a tokenizer without a chat template."""

from __future__ import annotations

import pytest
from latentmas.chat import FALLBACK_TEMPLATE, encode_conversation, end_of_turn_ids, render, template_of
from latentmas.prompts import SYSTEM_PROMPT, request_messages, training_messages

from tests.arch.models import LLAMA3_FAMILY, build_tokenizer

pytestmark = pytest.mark.arch


def test_requests_get_the_training_system_prompt_unless_they_bring_their_own() -> None:
    assert request_messages(prompt="q") == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "q"},
    ]
    own = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    assert request_messages(own) == own
    overridden = request_messages(own, prompt="q2", system_prompt="be kind")
    assert [m["content"] for m in overridden] == ["be kind", "q", "q2"]
    assert training_messages("q", "a")[:-1] == request_messages(prompt="q")
    assert training_messages("q", "a")[-1] == {"role": "assistant", "content": "a"}
    with pytest.raises(ValueError, match="a prompt or at least one message is required"):
        request_messages([])
    system_only = [{"role": "system", "content": "s"}]
    assert request_messages(system_only) == system_only, "the OpenAI API accepts a system-only conversation"


def test_a_tokenizer_without_a_chat_template_gets_the_documented_fallback() -> None:
    tokenizer = build_tokenizer(LLAMA3_FAMILY)
    tokenizer.chat_template = None
    assert template_of(tokenizer) == FALLBACK_TEMPLATE
    prompt = render(tokenizer, request_messages(prompt="What is a bond?"), add_generation_prompt=True)
    assert prompt == (
        f"<|begin_of_text|><|system|>\n{SYSTEM_PROMPT}<|end_of_text|>\n<|user|>\nWhat is a bond?<|end_of_text|>\n"
        "<|assistant|>\n"
    )
    ids, labels = encode_conversation(tokenizer, training_messages("What is a bond?", "A loan."))
    assert (
        tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100]) == "A loan.<|end_of_text|>"
    )
    assert end_of_turn_ids(tokenizer) == [tokenizer.eos_token_id]
