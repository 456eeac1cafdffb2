"""The base model's chat template, used the same way by training, evaluation and serving.

- `render`: messages -> text with the base's own template (or FALLBACK_TEMPLATE when it has none);
  the text is always tokenized with `add_special_tokens=False`, so a template that writes its own BOS
  gets exactly one.
- `encode_conversation`: (input_ids, labels) with the loss on assistant tokens only, found by
  rendering each assistant turn's prefix and end, so it works for templates without
  `{% generation %}` markers (SmolLM2's ChatML, Llama 3's, Qwen's ...).
- `end_of_turn_ids`: the tokens that end an assistant turn (the template's own, e.g. `<|im_end|>`,
  plus the configured EOS ids), where serving stops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE = -100
# Used when a tokenizer has no chat template: role-tagged turns, each closed by the tokenizer's EOS so
# that the end of an assistant turn is a single special token serving can stop at.
FALLBACK_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]


def template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or FALLBACK_TEMPLATE when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else FALLBACK_TEMPLATE


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Messages as text in the base's template (a prompt ready for the answer with `add_generation_prompt`)."""
    text = tokenizer.apply_chat_template(
        list(messages),
        chat_template=template_of(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return str(text)


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the prompt the model answers (template + generation prompt)."""
    return list(tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"])


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it: from the end of
    the generation prompt before the turn to the end of the turn (its end-of-turn token included, the
    whitespace the template writes after it not: the model stops at that token and never predicts it)."""
    full = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:index], add_generation_prompt=True)
        upto = render(tokenizer, messages[: index + 1])
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix (turn "
                f"{index}); assistant-only loss cannot locate the answer tokens"
            )
        spans.append((len(prefix), len(upto.rstrip())))
    return full, spans


def encode_conversation(
    tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels are IGNORE outside assistant turns."""
    full, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def end_of_turn_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Token ids that end an assistant turn: the special token the template writes right after an
    answer (e.g. `<|im_end|>`, `<|eot_id|>`), the tokenizer's EOS and the model's configured EOS ids."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    full, spans = assistant_spans(tokenizer, _PROBE)
    closing = full[spans[-1][0] :].removeprefix(_PROBE[-1]["content"])
    first = tokenizer(closing, add_special_tokens=False)["input_ids"][:1]
    if first and first[0] in special_ids(tokenizer):
        ids.add(int(first[0]))
    return sorted(ids)


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of special and added control tokens (what a response must never show)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {int(i) for i, token in added.items() if getattr(token, "special", False)}


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its EOS (SmolLM2's pad is its EOS)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
