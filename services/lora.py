"""Batched multi-LoRA: every LoRA target layer of the base model holds all resident adapters stacked in
fixed slots, and one forward pass serves a batch whose rows use different adapters (or mixtures).

The base projection runs once for the whole batch; each row's low-rank term is computed with a gathered
`bmm` over that row's slots (K slots per row, gate-weighted). A batch of 64 distinct adapters therefore
costs two small batched matmuls per layer, never 64 passes (what PEFT's `adapter_names` does)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter folder that cannot be served on this base model (reason in the message)."""


@dataclass
class AdapterWeights:
    """One adapter in serving form: per target module, A [r, in] and B*scale [out, r] (float32, CPU)."""

    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


@dataclass
class LoraContext:
    """Per-batch routing shared by every MultiLoraLinear: for each row, K slot indices and K gate weights.
    `indices is None` means the bare base model (no low-rank term at all)."""

    indices: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class MultiLoraLinear(nn.Module):
    """Wraps a base nn.Linear; holds `slots` stacked adapters padded to `max_rank` (install_multi_lora
    adds one more, always zero: the padding target of rows that use fewer slots than the widest row)."""

    def __init__(self, base: nn.Linear, slots: int, max_rank: int, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        weight = base.weight
        self.lora_a = nn.Parameter(
            torch.zeros(slots, max_rank, base.in_features, dtype=weight.dtype, device=weight.device),
            requires_grad=False,
        )
        self.lora_b = nn.Parameter(
            torch.zeros(slots, base.out_features, max_rank, dtype=weight.dtype, device=weight.device),
            requires_grad=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        indices, weights = self.context.indices, self.context.weights
        if indices is None or weights is None:
            return y
        batch, k = indices.shape
        rank = self.lora_a.shape[1]
        a = self.lora_a[indices].reshape(batch, k * rank, -1)  # [B, K*R, in]
        b = self.lora_b[indices].permute(0, 2, 1, 3).reshape(batch, -1, k * rank)  # [B, out, K*R]
        flat = x.reshape(batch, -1, x.shape[-1])
        xa = torch.bmm(flat, a.transpose(1, 2)) * weights.to(x.dtype).repeat_interleave(rank, dim=1)[:, None, :]
        return y + torch.bmm(xa, b.transpose(1, 2)).reshape(y.shape)

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copies one adapter's matrices into `slot` (zeros where it does not target this layer)."""
        self.lora_a.data[slot].zero_()
        self.lora_b.data[slot].zero_()
        if a is not None and b is not None:
            rank = a.shape[0]
            self.lora_a.data[slot, :rank].copy_(a.to(self.lora_a.dtype), non_blocking=True)
            self.lora_b.data[slot, :, :rank].copy_(b.to(self.lora_b.dtype), non_blocking=True)


@dataclass
class MultiLoraModel:
    """The base model with MultiLoraLinear layers installed, plus the shared routing context."""

    model: nn.Module
    layers: dict[str, MultiLoraLinear]
    context: LoraContext
    slots: int
    max_rank: int
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def null_slot(self) -> int:
        """A slot that always holds zeros: padding entries point here, so a broken adapter in a real slot
        can never leak into rows that do not use it (0 x NaN is NaN)."""
        return self.slots

    @property
    def slot_bytes(self) -> int:
        """Device memory one slot takes across all layers."""
        return sum(
            (layer.lora_a[0].numel() + layer.lora_b[0].numel()) * layer.lora_a.element_size()
            for layer in self.layers.values()
        )

    def write_slot(self, slot: int, adapter: AdapterWeights | None) -> None:
        if adapter is not None:
            unknown = set(adapter.modules) - set(self.layers)
            if unknown:
                raise AdapterFormatError(f"adapter targets modules not served here: {sorted(unknown)[:3]}")
            if adapter.rank > self.max_rank:
                raise AdapterFormatError(f"adapter rank {adapter.rank} exceeds the served max rank {self.max_rank}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                pair = adapter.modules.get(name) if adapter is not None else None
                layer.write_slot(slot, *(pair if pair is not None else (None, None)))


def install_multi_lora(model: nn.Module, target_modules: list[str], slots: int, max_rank: int) -> MultiLoraModel:
    """Replaces every nn.Linear whose last name part is in `target_modules` by a MultiLoraLinear."""
    context = LoraContext()
    layers: dict[str, MultiLoraLinear] = {}
    shapes: dict[str, tuple[int, int]] = {}
    targets = set(target_modules)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = MultiLoraLinear(module, slots + 1, max_rank, context)  # + the null slot
            setattr(parent, child, wrapped)
            layers[name] = wrapped
            shapes[name] = (module.out_features, module.in_features)
    if not layers:
        raise AdapterFormatError(f"no linear layer of the base model matches target modules {sorted(targets)}")
    return MultiLoraModel(model, layers, context, slots, max_rank, shapes)


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    alpha = float(next((v for k, v in alpha_pattern.items() if module.endswith(k)), config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_peft_adapter(folder: Path, shapes: dict[str, tuple[int, int]]) -> AdapterWeights:
    """Reads a PEFT LoRA folder and checks it against the base model's layer shapes (`shapes`:
    module name -> (out, in)) and for non-finite values (one NaN would poison every answer of the
    expert). Scaling is folded into B so serving needs no per-adapter constants."""
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFormatError(f"adapter file missing: {path.name}")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except Exception as err:
        raise AdapterFormatError(f"adapter unreadable: {err}") from err
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterFormatError(f"adapter type {config.get('peft_type')!r} is not LoRA")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem = key.removeprefix(_PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in stem:
                halves.setdefault(stem.split(marker)[0], {})[part] = tensor.float()
                break
        else:
            raise AdapterFormatError(f"adapter tensor {key!r} is not a LoRA A/B matrix")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for module, pair in halves.items():
        if module not in shapes:
            raise AdapterFormatError(f"adapter module {module!r} does not exist in the base model")
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"adapter module {module!r} lacks lora_A or lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        out_features, in_features = shapes[module]
        r = a.shape[0]
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise AdapterFormatError(
                f"adapter module {module!r}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit base "
                f"({out_features}x{in_features})"
            )
        scaled = b * _scaling(config, module, r)
        for part, tensor in (("lora_A", a), ("lora_B", scaled)):
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterFormatError(f"adapter module {module!r}: {part} holds non-finite values (NaN or inf)")
        modules[module] = (a.contiguous(), scaled.contiguous())
        rank = max(rank, r)
    if not modules:
        raise AdapterFormatError("adapter holds no LoRA tensors")
    return AdapterWeights(rank=rank, modules=modules)
