"""Which base architectures the platform trains and serves, and what LoRA adapts in them.

Supported are the Llama-family decoders: pre-norm blocks of attention (q/k/v/o projections) and a gated
MLP (gate/up/down), RoPE, an optional tied output head. Llama and SmolLM (a Llama with tied
embeddings) are `llama`; Mistral adds a sliding attention window; Qwen2 adds q/k/v biases; Qwen3 adds
q/k norms. Anything else fails at the base stage, before any training time is spent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_architecture(config: Mapping[str, Any] | Any) -> None:
    """Raises ValueError unless `config` (a config.json dict or a transformers config) is supported."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"base model architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def discover_target_modules(model: nn.Module) -> list[str]:
    """The LoRA targets of `model`: the name of every linear projection inside the decoder blocks
    (attention and MLP), in model order. The output head is left out, tied to the embeddings or not."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            names.setdefault(name.rsplit(".", 1)[-1], None)
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear projections to adapt")
    return list(names)
