"""Random-initialized Llama models, a locally built tokenizer and random LoRA adapters, published to a
registry: what the serving tests and the serving benchmark run on (no hub downloads anywhere)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from latentmas.registry import ArtifactEntry, ArtifactVersion, Registry, load_registry, save_registry, version_prefix
from latentmas.store import ObjectStore, sha256_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
WORDS = " ".join(
    (
        "the a an of to in and or is are was be on for with as by at from this that it not but",
        "which system user assistant model expert finance legal medical code answer question data",
        "market stock bond law court contract patient dose trial function class error value return",
        "loop list map cell risk price rate yield claim case judge drug health test run build",
        "deploy cluster node pod one two three four five six seven eight nine ten hello world what",
        "how why when where who",
    )
).split()


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    max_positions: int = 2048


PRESETS: dict[str, ModelShape] = {
    "test": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, max_positions=512),
    "cpu": ModelShape(hidden=256, layers=4, heads=8, kv_heads=2, ffn=1024),
    "1.1b": ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed small vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS) | set(":,.?!")))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llama_config(preset: str, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """A Llama config of the preset's shape, with separate input and output embeddings."""
    shape = PRESETS[preset]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.ffn,
        max_position_embeddings=shape.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_base(
    folder: Path,
    preset: str = "test",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Saves a random Llama of the preset's shape plus the tokenizer (default: the small word-level one; the
    benchmark passes a real one, so the vocabulary and embeddings have a real size) as an HF folder."""
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(preset, tokenizer))
    cast(torch.nn.Module, model).to(dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_adapter(base: Path, folder: Path, seed: int, rank: int = 4, targets: list[str] | None = None) -> Path:
    """A PEFT LoRA folder with random A and B (B non-zero, so adapters really differ from the base)."""
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(str(folder))
    return folder


def publish(
    store: ObjectStore,
    bucket: str,
    namespace: str,
    stack: str,
    kind: str,
    name: str,
    folder: Path,
    metrics: dict[str, Any] | None = None,
) -> tuple[Registry, int]:
    """Uploads a folder as the next version of an artifact, then repoints registry.json at it.
    kind is 'base', 'router', 'index' or 'experts'; `metrics` are recorded with the version (e.g. the
    `base_sha256` an adapter was trained on)."""
    registry = load_registry(store, bucket, namespace, stack)
    experts = registry.experts
    entry = experts.setdefault(name, ArtifactEntry()) if kind == "experts" else getattr(registry, kind)
    version = entry.next_version()
    prefix = version_prefix(namespace, stack, kind, name, version)
    files: dict[str, str] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        store.put_file(bucket, prefix + path.name, path)
        files[path.name] = sha256_file(path)
    entry.history.append(ArtifactVersion(version=version, prefix=prefix, files=files, metrics=metrics or {}))
    entry.current = version
    return save_registry(store, bucket, namespace, stack, registry), version
