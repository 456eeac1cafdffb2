"""Choosing experts for a request: an explicit adapter wins; otherwise the learned router's gate weights
are reduced by the routing mode (soft | top1 | top2), and below the confidence threshold the base model
answers. The decision is a pure function (evaluation calls it too, so it scores what is served);
`RouterRuntime` only computes the gate weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

RoutingMode = Literal["soft", "top1", "top2"]
SOFT_FLOOR = 0.01


@dataclass(frozen=True)
class RouteDecision:
    """Which experts answer with what weight; empty `experts` means the base model. `confidence` is the
    router's top gate weight (1.0 for an explicit choice)."""

    experts: list[tuple[str, float]]
    confidence: float
    reason: Literal["explicit", "router", "low_confidence", "no_router", "base"]


def decide(gates: dict[str, float], mode: RoutingMode, threshold: float, available: set[str]) -> RouteDecision:
    """Reduces router gate weights over served experts to the experts that answer."""
    served = {name: w for name, w in gates.items() if name in available}
    total = sum(served.values())
    if not served or total <= 0:
        return RouteDecision([], 0.0, "no_router")
    ranked = sorted(((n, w / total) for n, w in served.items()), key=lambda item: -item[1])
    confidence = ranked[0][1]
    if confidence < threshold:
        return RouteDecision([], confidence, "low_confidence")
    if mode == "top1":
        chosen = ranked[:1]
    elif mode == "top2":
        chosen = ranked[:2]
    else:
        chosen = [(n, w) for n, w in ranked if w >= SOFT_FLOOR]
    norm = sum(w for _, w in chosen)
    return RouteDecision([(n, w / norm) for n, w in chosen], confidence, "router")


class RouterRuntime:
    """A loaded router version of either kind (learned MLP or TF-IDF + LR): the request's question -> gate
    weights per expert."""

    def __init__(self, folder: Path, version: int, device: torch.device) -> None:
        from latentmas.training.routers import load_any_router

        self.router = load_any_router(folder, device=device)
        self.version = version
        self.device = device

    @property
    def kind(self) -> str:
        return self.router.kind

    def gates(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: str, temperature: float
    ) -> dict[str, float]:
        """Gate weights for `question`: `routing_text` of the request, the same text the router was trained and
        evaluated on (the MLP renders it as `encode_prompts` does; TF-IDF reads it as is)."""
        weights = self.router.gates(model, tokenizer, [question], temperature)[0]
        return {name: float(w) for name, w in zip(self.router.experts, weights.tolist(), strict=True)}
