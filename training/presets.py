"""Size presets of a bootstrapped Llama-architecture base model and its pre-training run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    context: int
    seq_len: int
    batch: int
    learning_rate: float


PRESETS: dict[str, Preset] = {
    # CPU tests: trains in seconds on two cores.
    "tiny": Preset(64, 2, 4, 4, 172, 4096, 512, 128, 16, 3e-3),
    "small": Preset(256, 4, 8, 8, 688, 8192, 1024, 256, 16, 1e-3),
    # ~110M parameters, a GPU preset.
    "base": Preset(768, 12, 12, 12, 2048, 16384, 2048, 512, 16, 6e-4),
    # ~0.6B parameters (grouped-query attention), the GPU benchmark size.
    "large": Preset(1536, 20, 12, 4, 4096, 32000, 2048, 512, 8, 3e-4),
}


def llama_config_kwargs(preset: Preset, vocab_size: int, special: dict[str, int]) -> dict[str, Any]:
    """LlamaConfig arguments. Input and output embeddings are separate (tie_word_embeddings=False), so the
    latent pipeline's realignment W_a is a real map (tied bases work too; there W_a is about the identity)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden,
        "intermediate_size": preset.intermediate,
        "num_hidden_layers": preset.layers,
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.kv_heads,
        "max_position_embeddings": preset.context,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        **special,
    }
