"""Bootstrapping a small generalist base model from the cleaned corpus: a BPE tokenizer trained here and
a random-initialized Llama pre-trained briefly with next-token prediction. Nothing comes from a hub."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from latentmas.training.presets import Preset, llama_config_kwargs
from latentmas.training.tokenizer import train_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

Progress = Callable[..., None]


def token_blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], seq_len: int) -> torch.Tensor:
    """The corpus as one token stream (bos text eos ...), cut into [n, seq_len] blocks."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(f"corpus too small to pre-train: {len(stream)} tokens < one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 10% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    model: LlamaForCausalLM, blocks: torch.Tensor, preset: Preset, steps: int, seed: int, progress: Progress
) -> float:
    """Next-token pre-training on random blocks; returns the mean loss of the last 10% of steps."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate, weight_decay=0.01)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    tail: list[float] = []
    started = time.monotonic()
    model.train()
    for step in range(steps):
        rows = torch.randint(0, blocks.shape[0], (preset.batch,), generator=generator)
        batch = blocks[rows].to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, preset.learning_rate)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            elapsed = time.monotonic() - started
            tokens_per_s = (step + 1) * batch.numel() / max(elapsed, 1e-9)
            eta = elapsed / (step + 1) * (steps - step - 1)
            progress(
                step + 1, steps, loss=round(loss.item(), 4), tokens_per_s=round(tokens_per_s, 1), eta_s=round(eta, 1)
            )
    model.eval()
    return sum(tail) / len(tail)


def bootstrap(
    texts: list[str], preset: Preset, vocab_size: int, steps: int, seed: int, out: Path, progress: Progress
) -> dict[str, float | int]:
    """Trains tokenizer and model and saves them as a Hugging Face folder (safetensors) in `out`."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size)
    special = {
        "bos_token_id": int(tokenizer.bos_token_id),
        "eos_token_id": int(tokenizer.eos_token_id),
        "pad_token_id": int(tokenizer.pad_token_id),
    }
    config = LlamaConfig(**llama_config_kwargs(preset, len(tokenizer), special))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    blocks = token_blocks(tokenizer, texts, preset.seq_len)
    final_loss = pretrain(model, blocks, preset, steps, seed, progress)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "pretrain_loss": round(final_loss, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "corpus_tokens": int(blocks.numel()),
    }
