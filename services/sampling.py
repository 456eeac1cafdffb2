"""Per-row sampling for a mixed batch (each request its own temperature/top-k/top-p) and stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the decoder. temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)


def sample_next(logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from `logits` [B, V]; greedy rows take the argmax, the others a filtered softmax."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    if bool((temps <= 0).all()):
        return greedy
    scaled = logits / temps.clamp_min(1e-5)[:, None]
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], float("-inf"))
    choice = torch.multinomial(sorted_logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(temps <= 0, greedy, sampled)


def stop_cut(text: str, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """(index where the first stop string begins or None, how many chars are safe to stream now): text
    that could still turn into a stop string is held back."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if hits:
        return min(hits), min(hits)
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return None, len(text) - hold
