"""The `router` stage (MoLE-style, stage 1): the base and adapters stay frozen; a 2-layer MLP learns to
map prompt features (an early hidden state of the base, pooled over the prompt) to the expert whose
domain the prompt belongs to. Writes `router/` (router.json + router.safetensors) and `metrics.json`
with held-out accuracy, the confusion matrix and the gate entropy."""

from __future__ import annotations

import math
from typing import Any

import torch
from latentmas.spec import ExpertSpec
from latentmas.stage import StageContext, StageResult, skipped
from latentmas.training.base import load_base
from latentmas.training.data import prompt_of, read_sft
from latentmas.training.modelstore import upload_folder
from latentmas.training.router_model import (
    RouterConfig,
    RouterMLP,
    encode_prompts,
    gate,
    gate_entropy,
    prompt_features,
    save_router,
)
from latentmas.training.skips import active_experts, router_skip_reason
from torch import nn

ROUTER_DIR = "router/"
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
) -> RouterMLP:
    """Full-batch AdamW on cross-entropy of the tempered gate (+ optional load-balancing term)."""
    torch.manual_seed(seed)
    router = RouterMLP(features.shape[1], hidden, n_experts)
    optimizer = torch.optim.AdamW(router.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(epochs):
        logits = router(features)
        loss = nn.functional.cross_entropy(logits / temperature, labels)
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


def labelled_prompts(
    ctx: StageContext, experts: list[ExpertSpec], split: str, limit: int | None
) -> tuple[list[str], torch.Tensor]:
    prompts: list[str] = []
    labels: list[int] = []
    for index, expert in enumerate(experts):
        rows = read_sft(ctx, expert.domain, split, limit)
        prompts += [prompt_of(row) for row in rows]
        labels += [index] * len(rows)
    return prompts, torch.tensor(labels)


def router_stage(ctx: StageContext) -> StageResult:
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
    train_prompts, train_labels = labelled_prompts(ctx, active, "train", MAX_TRAIN_PROMPTS)
    held_prompts, held_labels = labelled_prompts(ctx, active, "heldout", ctx.spec.evaluation.max_heldout_examples)
    layer = training.router_feature_layer
    train_features = features_of(model, tokenizer, train_prompts, layer)
    held_features = features_of(model, tokenizer, held_prompts, layer)
    temperature = ctx.spec.inference.router_temperature
    config = RouterConfig(experts, layer, temperature, training.router_hidden, int(train_features.shape[1]))
    ctx.progress(0, training.router_epochs, examples=len(train_prompts))
    router = fit_router(
        train_features,
        train_labels,
        len(experts),
        config.hidden,
        temperature,
        training.router_epochs,
        training.router_balance_weight,
        training.seed,
    )
    ctx.progress(training.router_epochs, training.router_epochs)
    metrics: dict[str, Any] = {
        "experts": experts,
        "feature_layer": layer,
        "train": router_metrics(router, temperature, train_features, train_labels),
        "heldout": router_metrics(router, temperature, held_features, held_labels),
    }
    folder = ctx.workdir / "router"
    save_router(folder, router, config)
    files = upload_folder(ctx.store, ctx.bucket, ctx.key(ROUTER_DIR), folder)
    ctx.put_json(METRICS, metrics)
    summary = {
        "heldout_accuracy": metrics["heldout"]["accuracy"],
        "heldout_gate_entropy": metrics["heldout"]["gate_entropy"],
        "train_accuracy": metrics["train"]["accuracy"],
    }
    return StageResult(
        outputs=[ROUTER_DIR + name for name in files] + [METRICS],
        counts={"train_prompts": len(train_prompts), "heldout_prompts": len(held_prompts)},
        metrics=summary,
    )
