"""Choosing experts for a request: an explicit adapter wins; otherwise the learned router's gate weights
are reduced by the routing mode (soft | top1 | top2); below the confidence threshold, or when the router's
top choice is an expert without a served version, the base model answers. The decision is a pure function
(evaluation calls it too, so it scores what is served); `RouterRuntime` only computes the gate weights."""

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
    reason: Literal["explicit", "router", "low_confidence", "unserved_expert", "no_router", "no_question", "base"]


def decide(gates: dict[str, float], mode: RoutingMode, threshold: float, available: set[str]) -> RouteDecision:
    """Reduces router gate weights to the experts that answer. The router's own top choice decides whether
    an expert answers at all: below `threshold`, or when that expert has no version on this server (not
    promoted yet), the base answers — a question of an unpromoted domain is never handed to the nearest
    promoted expert. Otherwise the mode picks from the router's ranking, experts without a version are dropped
    from that pick, and the rest are renormalized."""
    total = sum(gates.values())
    if not set(gates) & available or total <= 0:
        return RouteDecision([], 0.0, "no_router")
    ranked = sorted(((n, w / total) for n, w in gates.items()), key=lambda item: -item[1])
    top, confidence = ranked[0]
    if confidence < threshold:
        return RouteDecision([], confidence, "low_confidence")
    if top not in available:
        return RouteDecision([], confidence, "unserved_expert")
    if mode == "top1":
        picked = ranked[:1]
    elif mode == "top2":
        picked = ranked[:2]
    else:
        picked = [(n, w) for n, w in ranked if w >= SOFT_FLOOR]
    chosen = [(n, w) for n, w in picked if n in available]
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

    @property
    def reads_model(self) -> bool:
        """Whether gate weights need a forward pass of the base (the MLP's features); TF-IDF reads text alone."""
        return self.router.mlp is not None

    def gates(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: str, temperature: float
    ) -> dict[str, float]:
        """Gate weights for `question`: `routing_text` of the request, the same text the router was trained and
        evaluated on (the MLP renders it as `encode_prompts` does; TF-IDF reads it as is)."""
        return self.gates_many(model, tokenizer, [(question, temperature)])[0]

    def gates_many(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, asks: list[tuple[str, float]]
    ) -> list[dict[str, float]]:
        """Gate weights for several (question, temperature) pairs: one batched call per distinct temperature
        (requests rarely set their own, so usually one). The MLP's call is a truncated forward of the bare
        base (`prompt_features`: right-padded, stopped at the feature layer, no later blocks, no LM head)."""
        by_temperature: dict[float, list[int]] = {}
        for index, (_, temperature) in enumerate(asks):
            by_temperature.setdefault(temperature, []).append(index)
        out: list[dict[str, float]] = [{} for _ in asks]
        for temperature, indices in by_temperature.items():
            weights = self.router.gates(model, tokenizer, [asks[i][0] for i in indices], temperature)
            for index, row in zip(indices, weights.tolist(), strict=True):
                out[index] = {name: float(w) for name, w in zip(self.router.experts, row, strict=True)}
        return out
