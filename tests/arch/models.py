"""Tiny random checkpoints of every supported architecture, each with a byte-level BPE tokenizer and a
chat template written for the tests in the style of its family (nothing comes from a hub):

- llama:   Llama 3 headers, `<|eot_id|>` ends a turn, EOS is a different token;
- smollm:  a Llama with tied embeddings and SmolLM2's own ChatML template (injects a system prompt);
- qwen2:   ChatML, q/k/v biases, EOS `<|endoftext|>` is not the end-of-turn token;
- qwen3:   ChatML, q/k norms, explicit head_dim, tied embeddings;
- mistral: `[INST]` turns closed by EOS, a sliding window shorter than the prompts.
No template has `{% generation %}` markers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system + '\\n\\n' if system and loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
CORPUS = [
    "How do I open a file for reading? Use open(path) inside a with block.",
    "What is a bond yield? The return an investor earns on a bond, as a rate.",
    "Which court hears appeals? The appellate court reviews the judgment.",
    "What dose is safe? Follow the label and ask a doctor before a trial.",
    "List the files in a folder with ls, then sort them by size.",
]


@dataclass(frozen=True)
class Family:
    """Tokenizer conventions of one model family."""

    template: str
    bos: str | None
    eos: str
    pad: str | None
    extra: tuple[str, ...]
    end_of_turn: str


LLAMA3_FAMILY = Family(
    LLAMA3,
    "<|begin_of_text|>",
    "<|end_of_text|>",
    None,
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "<|eot_id|>",
)
SMOLLM_FAMILY = Family(SMOLLM2, "<|im_start|>", "<|im_end|>", "<|im_end|>", ("<|endoftext|>",), "<|im_end|>")
QWEN_FAMILY = Family(CHATML, None, "<|endoftext|>", "<|endoftext|>", ("<|im_start|>", "<|im_end|>"), "<|im_end|>")
MISTRAL_FAMILY = Family(MISTRAL, "<s>", "</s>", None, ("[INST]", "[/INST]"), "</s>")


def build_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, with the family's special tokens and template."""
    specials = list(dict.fromkeys([t for t in (family.bos, family.eos, family.pad) if t] + list(family.extra)))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        additional_special_tokens=[t for t in family.extra if t not in (family.bos, family.eos, family.pad)],
    )
    tokenizer.chat_template = family.template
    return tokenizer


# initializer_range 0.3: the frozen output head of a 32-wide model initialised at the usual 0.02 cannot move
# logits far enough for a LoRA to learn anything, so training could not be told apart from noise.
SHAPE: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
SHAPE |= {"intermediate_size": 64, "max_position_embeddings": 512, "initializer_range": 0.3}


def build_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    if arch == "llama":
        return LlamaConfig(**SHAPE, **ids, tie_word_embeddings=False)
    if arch == "smollm":
        return LlamaConfig(**SHAPE, **ids, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**SHAPE, **ids, tie_word_embeddings=False)
    if arch == "qwen3":
        return Qwen3Config(**SHAPE, **ids, head_dim=8, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**SHAPE, **ids, sliding_window=8, tie_word_embeddings=False)
    raise KeyError(arch)


FAMILIES = {
    "llama": LLAMA3_FAMILY,
    "smollm": SMOLLM_FAMILY,
    "qwen2": QWEN_FAMILY,
    "qwen3": QWEN_FAMILY,
    "mistral": MISTRAL_FAMILY,
}
ARCHITECTURES = tuple(FAMILIES)


def build_checkpoint(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random tiny checkpoint of `arch` saved as an HF folder (safetensors + tokenizer + template)."""
    tokenizer = build_tokenizer(FAMILIES[arch])
    config = build_config(arch, tokenizer)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if config.pad_token_id is not None:  # random init zeroes the padding row; a trained checkpoint has a real
        with torch.no_grad():  # vector there (SmolLM2 pads with its end-of-turn token, which must stay learnable)
            model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, config.initializer_range)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
