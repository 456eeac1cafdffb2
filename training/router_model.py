"""The learned expert router (MoLE-style stage 1), shared by the router stage and the inference service.

Features are an early hidden state of the frozen base model, mean-pooled over the prompt's non-padding
tokens; a 2-layer MLP maps them to one logit per expert, and a temperature softmax turns logits into
gate weights. Saved as `router.json` (config, `kind: mlp`) + `router.safetensors` (weights, never pickle).
The other router kind, TF-IDF + logistic regression, is `router_tfidf`; `routers` loads either."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from latentmas.chat import encode_prompt, pad_token_id
from latentmas.prompts import request_messages
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"


@dataclass(frozen=True)
class RouterConfig:
    """What a reader needs to rebuild the router and compute its features the same way."""

    experts: list[str]
    feature_layer: int
    temperature: float
    hidden: int
    input_dim: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouterConfig:
        return cls(
            experts=[str(e) for e in data["experts"]],
            feature_layer=int(data["feature_layer"]),
            temperature=float(data["temperature"]),
            hidden=int(data["hidden"]),
            input_dim=int(data["input_dim"]),
        )


class RouterMLP(nn.Module):
    """Two linear layers with a GELU in between: pooled features -> one logit per expert."""

    def __init__(self, input_dim: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU(), nn.Linear(hidden, n_experts))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(features)
        return out


def gate(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gate weights over experts: softmax of logits / temperature (lower temperature = sharper)."""
    if temperature <= 0:
        raise ValueError(f"router temperature must be > 0, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)


def apply_mode(weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Routing modes over gate weights: `soft` keeps them, `top1`/`top2` keep the k largest, renormalised."""
    if mode == "soft":
        return weights
    k = {"top1": 1, "top2": 2}.get(mode)
    if k is None:
        raise ValueError(f"unknown routing mode {mode!r}; expected soft, top1 or top2")
    k = min(k, weights.shape[-1])
    top = torch.topk(weights, k, dim=-1)
    kept = torch.zeros_like(weights).scatter(-1, top.indices, top.values)
    return kept / kept.sum(dim=-1, keepdim=True)


def gate_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of gate weights; 0 = certain, log(n_experts) = uniform."""
    return -(weights * torch.log(weights.clamp_min(1e-12))).sum(dim=-1)


class _FeaturesReady(Exception):
    """Raised by the capture hook to stop the forward pass once the feature layer has run."""


def _feature_module(model: nn.Module, layer: int) -> nn.Module | None:
    """The module whose output is hidden_states[layer] of a Llama-family decoder, or None if the model does not
    expose `get_decoder()` with `embed_tokens`, `layers` and `norm`."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if decoder is None or layers is None or not hasattr(decoder, "embed_tokens") or not hasattr(decoder, "norm"):
        return None
    if not 0 <= layer <= len(layers):
        raise ValueError(f"router feature layer {layer} out of range 0..{len(layers)}")
    if layer == 0:
        return cast(nn.Module, decoder.embed_tokens)
    return cast(nn.Module, decoder.norm if layer == len(layers) else layers[layer - 1])


@torch.no_grad()
def prompt_features(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """Mean of hidden_states[layer] over non-padding tokens, from the base model alone.

    The caller passes the bare base model (no adapters active) so features do not depend on which
    experts exist. Layer 0 is the embedding output; layer k is the output of decoder block k (the last, after
    the final norm, as in transformers' `hidden_states`). The forward pass stops at that layer: no later blocks,
    no LM head (the cost is layer/num_layers of a full forward)."""
    module = _feature_module(model, layer)
    if module is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        if not 0 <= layer < len(out.hidden_states):
            raise ValueError(f"router feature layer {layer} out of range 0..{len(out.hidden_states) - 1}")
        hidden = out.hidden_states[layer].float()
    else:
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _FeaturesReady

        handle = module.register_forward_hook(capture)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _FeaturesReady:
            pass
        finally:
            handle.remove()
        hidden = captured[0].float()
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled: torch.Tensor = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return pooled


def encode_prompts(tokenizer: Any, prompts: list[str], max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's input for user prompts: each prompt as serving renders a request for it (system
    prompt, user turn, generation prompt, in the base's chat template), right-padded."""
    rows = [encode_prompt(tokenizer, request_messages(prompt=prompt))[:max_length] for prompt in prompts]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def route(
    model: nn.Module, tokenizer: Any, router: RouterMLP, config: RouterConfig, prompts: list[str], batch_size: int = 32
) -> torch.Tensor:
    """Gate weights [len(prompts), n_experts] for user prompts, computed on the bare base `model`."""
    device = next(model.parameters()).device
    weights = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start : start + batch_size])
        features = prompt_features(model, ids.to(device), mask.to(device), config.feature_layer)
        weights.append(gate(router(features.to(next(router.parameters()).device)), config.temperature).cpu())
    return torch.cat(weights)


def save_router(folder: Path, router: RouterMLP, config: RouterConfig) -> list[str]:
    """Writes router.json and router.safetensors into `folder`; returns the file names written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"kind": "mlp", **asdict(config)}, indent=2, sort_keys=True))
    weights = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE))
    return [CONFIG_FILE, WEIGHTS_FILE]


def load_router(folder: Path, device: str | torch.device = "cpu") -> tuple[RouterMLP, RouterConfig]:
    """Rebuilds the router from `folder`; fails with the file name if either file is missing or mismatched."""
    config_path, weights_path = Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"router file missing: {path}")
    config = RouterConfig.from_json(json.loads(config_path.read_text()))
    router = RouterMLP(config.input_dim, config.hidden, len(config.experts))
    router.load_state_dict(load_file(str(weights_path), device=str(device)))
    router.to(device).eval()
    return router, config
