"""The two router kinds behind one call, for evaluation and serving alike: `mlp` (the learned MoLE router on the
base's hidden states) and `tfidf-lr` (TF-IDF + logistic regression). Both read the same text, the question
`latentmas.prompts.routing_text` takes from a conversation. A saved router's `router.json` names its kind;
one without a kind was written before there were two and is the MLP."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from latentmas.training.router_model import CONFIG_FILE, RouterConfig, RouterMLP, gate, load_router, route
from latentmas.training.router_tfidf import KIND as TFIDF_KIND
from latentmas.training.router_tfidf import TfidfRouter, load_tfidf_router
from torch import nn

MLP_KIND = "mlp"
KINDS = (MLP_KIND, TFIDF_KIND)


def router_kind(folder: Path) -> str:
    """The kind a saved router folder holds (`mlp` when its router.json predates kinds)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"router file missing: {path}")
    kind = str(json.loads(path.read_text()).get("kind", MLP_KIND))
    if kind not in KINDS:
        raise ValueError(f"router {folder}: unknown kind {kind!r}; this version reads {', '.join(KINDS)}")
    return kind


@dataclass
class Router:
    """A loaded router of either kind."""

    kind: str
    experts: list[str]
    mlp: tuple[RouterMLP, RouterConfig] | None = None
    tfidf: TfidfRouter | None = None

    @property
    def temperature(self) -> float:
        if self.mlp is not None:
            return self.mlp[1].temperature
        assert self.tfidf is not None
        return self.tfidf.temperature

    def gates(
        self, model: nn.Module, tokenizer: Any, questions: list[str], temperature: float | None = None
    ) -> torch.Tensor:
        """Gate weights [len(questions), n_experts]; the MLP reads the bare base `model`, TF-IDF the text alone."""
        if self.mlp is not None:
            router, config = self.mlp
            if temperature is not None and temperature != config.temperature:
                config = RouterConfig(
                    config.experts, config.feature_layer, temperature, config.hidden, config.input_dim
                )
            return route(model, tokenizer, router, config, questions)
        assert self.tfidf is not None
        return gate(self.tfidf.logits(questions), temperature or self.tfidf.temperature)


def load_any_router(folder: Path, device: str | torch.device = "cpu") -> Router:
    kind = router_kind(folder)
    if kind == MLP_KIND:
        router, config = load_router(folder, device=device)
        return Router(kind, config.experts, mlp=(router, config))
    tfidf = load_tfidf_router(folder)
    return Router(kind, tfidf.experts, tfidf=tfidf)
