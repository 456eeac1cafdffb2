"""The `router` stage (MoLE-style, stage 1): the base and adapters stay frozen; a 2-layer MLP learns to
map question features (an early hidden state of the base, pooled over the question) to the expert whose
domain the question belongs to, and a TF-IDF + logistic-regression router learns the same from the words.
Writes `router/` (the MLP), `router-tfidf/` (the baseline) and `metrics.json` with each kind's accuracy,
confusion matrix and gate entropy on held-out SFT questions and on the natural questions' test half, and
which kind the gate chose and why."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from latentmas.stage import StageContext, StageResult, skipped
from latentmas.training.base import load_base
from latentmas.training.gate import router_choice
from latentmas.training.modelstore import upload_folder
from latentmas.training.router_data import (
    combine,
    natural_questions,
    paraphrase_questions,
    sft_questions,
    training_weights,
)
from latentmas.training.router_model import (
    RouterConfig,
    RouterMLP,
    encode_prompts,
    gate,
    gate_entropy,
    prompt_features,
    save_router,
)
from latentmas.training.router_tfidf import KIND as TFIDF_KIND
from latentmas.training.router_tfidf import TfidfRouter, fit_tfidf_router, save_tfidf_router
from latentmas.training.routers import KINDS, MLP_KIND
from latentmas.training.skips import active_experts, router_skip_reason
from torch import nn

ROUTER_DIR = "router/"
ROUTER_DIRS = {MLP_KIND: ROUTER_DIR, TFIDF_KIND: "router-tfidf/"}
METRICS = "metrics.json"
MAX_TRAIN_PROMPTS = 2000


@torch.no_grad()
def features_of(model: nn.Module, tokenizer: Any, prompts: list[str], layer: int, batch_size: int = 32) -> torch.Tensor:
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start : start + batch_size])
        chunks.append(prompt_features(model, ids.to(device), mask.to(device), layer).cpu())
    return torch.cat(chunks)


def balance_penalty(weights: torch.Tensor) -> torch.Tensor:
    """0 when the batch's mean gate is uniform over experts, growing as load concentrates on a few."""
    mean = weights.mean(dim=0)
    return mean.numel() * (mean**2).sum() - 1.0


def fit_router(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_experts: int,
    hidden: int,
    temperature: float,
    epochs: int,
    balance_weight: float,
    seed: int,
    weights: torch.Tensor | None = None,
) -> RouterMLP:
    """Full-batch AdamW on cross-entropy of the tempered gate, each example weighted by `weights` (all 1 when
    None), plus an optional load-balancing term."""
    torch.manual_seed(seed)
    router = RouterMLP(features.shape[1], hidden, n_experts)
    optimizer = torch.optim.AdamW(router.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(epochs):
        logits = router(features)
        each = nn.functional.cross_entropy(logits / temperature, labels, reduction="none")
        loss = each.mean() if weights is None else (each * weights).sum() / weights.sum()
        if balance_weight > 0:
            loss = loss + balance_weight * balance_penalty(gate(logits, temperature))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return router.eval()


def confusion(labels: list[int], predicted: list[int], n: int) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    matrix = [[0] * n for _ in range(n)]
    for truth, guess in zip(labels, predicted, strict=True):
        matrix[truth][guess] += 1
    return matrix


@torch.no_grad()
def router_metrics(
    router: RouterMLP, temperature: float, features: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    weights = gate(router(features), temperature)
    predicted = weights.argmax(dim=-1)
    entropy = gate_entropy(weights)
    return {
        "accuracy": round(float((predicted == labels).float().mean()), 4),
        "confusion": confusion(labels.tolist(), predicted.tolist(), weights.shape[1]),
        "gate_entropy": round(float(entropy.mean()), 4),
        "gate_entropy_max": round(math.log(weights.shape[1]), 4),
        "examples": int(labels.numel()),
    }


def read_router_metrics(ctx: StageContext) -> dict[str, Any]:
    """This cycle's finished router stage's `metrics.json` (both kinds' scores and the choice)."""
    ctx.read_manifest("router")
    return dict(json.loads(ctx.store.get_bytes(ctx.bucket, ctx.prefix("router") + METRICS)))


def tfidf_metrics(router: TfidfRouter, texts: list[str], labels: list[int]) -> dict[str, Any]:
    """The same report as `router_metrics`, for the TF-IDF + LR router."""
    weights = gate(router.logits(texts), router.temperature)
    predicted = weights.argmax(dim=-1)
    truth = torch.tensor(labels)
    return {
        "accuracy": round(float((predicted == truth).float().mean()), 4),
        "confusion": confusion(labels, predicted.tolist(), weights.shape[1]),
        "gate_entropy": round(float(gate_entropy(weights).mean()), 4),
        "gate_entropy_max": round(math.log(weights.shape[1]), 4),
        "examples": len(labels),
    }


def router_stage(ctx: StageContext) -> StageResult:
    """Trains both router kinds on the same texts and reports both on held-out SFT questions and on the natural
    questions' test half; the gate (`router_choice`) picks the one promotion registers and evaluation scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    training = ctx.spec.pipeline.training
    active = active_experts(ctx)
    reason = router_skip_reason(active)
    if reason is not None:
        return skipped(reason)
    experts = [expert.name for expert in active]
    base_dir = load_base(ctx)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    layers = int(model.config.num_hidden_layers)
    if training.router_feature_layer > layers:
        raise ValueError(f"routerFeatureLayer {training.router_feature_layer} > the base's {layers} layers")
    natural_train = natural_questions(active, "tune")
    synthetic = combine(
        sft_questions(ctx, active, "train", MAX_TRAIN_PROMPTS), paraphrase_questions(ctx, active, "train")
    )
    train_texts, train_labels = combine(synthetic, natural_train)
    weights = training_weights(len(synthetic[0]), len(natural_train[0]))
    held_texts, held_labels = sft_questions(ctx, active, "heldout", ctx.spec.evaluation.max_heldout_examples)
    test_texts, test_labels = natural_questions(active, "test")
    layer = training.router_feature_layer
    train_features = features_of(model, tokenizer, train_texts, layer)
    held_features = features_of(model, tokenizer, held_texts, layer)
    temperature = ctx.spec.inference.router_temperature
    config = RouterConfig(experts, layer, temperature, training.router_hidden, int(train_features.shape[1]))
    ctx.progress(0, training.router_epochs, examples=len(train_texts))
    labels = torch.tensor(train_labels)
    router = fit_router(
        train_features,
        labels,
        len(experts),
        config.hidden,
        temperature,
        training.router_epochs,
        training.router_balance_weight,
        training.seed,
        torch.tensor(weights),
    )
    ctx.progress(training.router_epochs, training.router_epochs)
    tfidf = fit_tfidf_router(train_texts, train_labels, experts, temperature, training.seed, weights)
    kinds: dict[str, dict[str, Any]] = {
        MLP_KIND: {
            "train": router_metrics(router, temperature, train_features, labels),
            "heldout": router_metrics(router, temperature, held_features, torch.tensor(held_labels)),
        },
        TFIDF_KIND: {
            "train": tfidf_metrics(tfidf, train_texts, train_labels),
            "heldout": tfidf_metrics(tfidf, held_texts, held_labels),
        },
    }
    if test_texts:
        test_features = features_of(model, tokenizer, test_texts, layer)
        kinds[MLP_KIND]["natural"] = router_metrics(router, temperature, test_features, torch.tensor(test_labels))
        kinds[TFIDF_KIND]["natural"] = tfidf_metrics(tfidf, test_texts, test_labels)
    choice = router_choice(kinds)
    metrics: dict[str, Any] = {
        "experts": experts,
        "feature_layer": layer,
        "train": kinds[MLP_KIND]["train"],
        "heldout": kinds[MLP_KIND]["heldout"],
        "kinds": kinds,
        "choice": {"kind": choice.kind, "reason": choice.reason},
        "natural_questions": {"tune": len(natural_train[0]), "test": len(test_texts)},
        "training_texts": {"synthetic": len(synthetic[0]), "natural": len(natural_train[0])},
    }
    outputs = [ROUTER_DIR + name for name in save_router(ctx.workdir / "router", router, config)]
    upload_folder(ctx.store, ctx.bucket, ctx.key(ROUTER_DIR), ctx.workdir / "router")
    names = save_tfidf_router(ctx.workdir / "router-tfidf", tfidf)
    upload_folder(ctx.store, ctx.bucket, ctx.key(ROUTER_DIRS[TFIDF_KIND]), ctx.workdir / "router-tfidf")
    outputs += [ROUTER_DIRS[TFIDF_KIND] + name for name in names]
    ctx.put_json(METRICS, metrics)
    summary: dict[str, Any] = {
        "heldout_accuracy": kinds[MLP_KIND]["heldout"]["accuracy"],
        "heldout_gate_entropy": kinds[MLP_KIND]["heldout"]["gate_entropy"],
        "train_accuracy": kinds[MLP_KIND]["train"]["accuracy"],
        "kind": choice.kind,
        "choice": choice.reason,
        **{
            f"{kind.replace('-', '_')}_{part}_accuracy": kinds[kind][part]["accuracy"]
            for kind in KINDS
            for part in ("heldout", "natural")
            if part in kinds[kind]
        },
    }
    return StageResult(
        outputs=[*outputs, METRICS],
        counts={"train_prompts": len(train_texts), "heldout_prompts": len(held_texts), "natural_test": len(test_texts)},
        metrics=summary,
    )
