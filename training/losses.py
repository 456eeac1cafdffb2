"""Held-out scoring: mean negative log-likelihood of the assistant answer tokens (the tokens SFT trains),
for the bare base, one adapter, or a router-weighted mixture of adapters."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from latentmas.chat import encode_conversation
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner
from torch import nn


@dataclass(frozen=True)
class Score:
    nll: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": round(self.loss, 5), "perplexity": round(self.perplexity, 4), "tokens": self.tokens}


Example = tuple[list[int], list[int]]


def encode_examples(tokenizer: Any, conversations: Sequence[list[dict[str, str]]], max_length: int) -> list[Example]:
    """(input_ids, labels) per conversation, exactly as SFT trains on it (labels -100 outside answers)."""
    return [encode_conversation(tokenizer, messages, max_length) for messages in conversations]


@torch.no_grad()
def score_each(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16) -> list[Score]:
    """Summed next-token NLL over each example's labelled tokens, and their count, one Score per example."""
    device = next(model.parameters()).device
    scores: list[Score] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (tokens, targets) in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(targets)] = torch.tensor(targets)
            mask[row, : len(tokens)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        shifted = labels[:, 1:].to(device)
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none"
        ).view(shifted.shape)
        counts = (shifted != -100).sum(dim=1)
        scores += [Score(float(n), int(c)) for n, c in zip(nll.sum(dim=1).tolist(), counts.tolist(), strict=True)]
    return scores


def score(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16) -> Score:
    """Summed next-token NLL over labelled tokens and their count."""
    parts = score_each(model, examples, pad_id, batch_size)
    return Score(sum(p.nll for p in parts), sum(p.tokens for p in parts))


def activate(model: PeftModel, names: list[str]) -> None:
    """Makes exactly `names` the active adapters (frozen); several active adapters add their deltas."""
    tuner = cast(BaseTuner, model.base_model)
    tuner.set_adapter(names, inference_mode=True)


@contextmanager
def adapter_mixture(model: PeftModel, weights: dict[str, float]) -> Iterator[None]:
    """Activates several LoRA adapters at once, each delta scaled by its gate weight (a soft MoLE mix)."""
    names = list(weights)
    activate(model, names)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        for layer in layers:
            for name, weight in weights.items():
                layer.set_scale(name, weight)
        yield
    finally:
        for layer in layers:
            for name in names:
                layer.set_scale(name, 1.0)


def mixed_score(
    model: PeftModel, examples: Sequence[Example], gates: torch.Tensor, experts: list[str], pad_id: int
) -> Score:
    """Scores each example under its own router mixture of the experts' adapters."""
    total, count = 0.0, 0
    for example, weights in zip(examples, gates.tolist(), strict=True):
        with adapter_mixture(model, dict(zip(experts, weights, strict=True))):
            part = score(model, [example], pad_id)
        total, count = total + part.nll, count + part.tokens
    return Score(total, count)
