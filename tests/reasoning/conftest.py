"""A tiny random Llama (untied head, as LatentMAS needs W_in != W_out) and a tokenizer trained here,
so the reasoning tests need no download."""

from __future__ import annotations

from typing import Any

import pytest
import torch

CORPUS = [
    "You are a helpful assistant in a team of expert agents.",
    "Planner Critic Refiner Judger agent plan feedback question answer latent working memory",
    "What is the capital of France? Paris is the capital of France.",
    "Interest rates, bonds and equity risk premia drive portfolio returns.",
    "Kubernetes operators reconcile custom resources into pods and jobs.",
    "The quick brown fox jumps over the lazy dog 0123456789 .,:;!?()[]",
]


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")


def build_model(vocab: int, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_lm() -> tuple[Any, Any]:
    tokenizer = build_tokenizer()
    return build_model(len(tokenizer)), tokenizer


@pytest.fixture(scope="session")
def embedder() -> Any:
    from latentmas.jobs.embedding import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def backend(tiny_lm: tuple[Any, Any], embedder: Any) -> Any:
    from tests.reasoning.standin import TinyBackend

    tokenizer = tiny_lm[1]
    return TinyBackend(build_model(len(tokenizer), seed=1), tokenizer, embedder)
