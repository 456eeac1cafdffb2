"""Batched multi-LoRA: every LoRA target layer of the base model holds all resident adapters stacked in
fixed slots, and one forward pass serves a batch whose rows use different adapters (or mixtures).

The base projection runs once for the whole batch. The low-rank term is dense over the slots the batch
uses: `((x @ A_cat.T) * S) @ B_cat`, where A_cat / B_cat are the leading slots' stacks read as one matrix
(a view, no copy) and S is the step's mixture matrix (each row's gate weight per slot, repeated over the
rank), built once per step and shared by every layer. Each resident adapter is therefore read once per
layer per step whatever the number of rows using it, top-2 and soft rows cost the same as top-1 ones,
and rows without any adapter are left out of the low-rank term (gathered away) so they pay nothing.
Stacks are as wide as the largest rank resident so far (grown on demand up to `maxLoraRank`), so
rank-16 adapters never pay for a 64-wide padding."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

Mix = Sequence[tuple[int, float]]


class AdapterFormatError(ValueError):
    """An adapter folder that cannot be served on this base model (reason in the message)."""


@dataclass
class AdapterWeights:
    """One adapter in serving form: per target module, A [r, in] and B*scale [out, r] (CPU, the serving dtype
    once staged)."""

    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


Form = Literal["auto", "dense", "gathered"]


@dataclass
class LoraPlan:
    """One step's routing. Dense form: `scale` [rows, used_slots * rank] holds each row's gate weight per slot
    column. Gathered form (`slots` set): `slots` [rows, K] each row's slots and `scale` [rows, K * rank] its
    gates repeated over the rank. `rows`: the batch rows that use any adapter (None: every row does)."""

    scale: torch.Tensor
    rows: torch.Tensor | None
    slots: torch.Tensor | None = None


def gathered_is_cheaper(device: torch.device, pairs: int, rows: int, width: int) -> bool:
    """Whether to copy each row's own adapters (gathered) rather than multiply every row by every used slot
    (dense). Dense reads each resident adapter once, which wins where memory traffic decides (GPU); its
    arithmetic grows with rows x used slots, which decides on a CPU: there the gathered form (arithmetic and
    copies both ~ the rows' own (slot, gate) pairs, but small batched products and gathers have a high fixed
    cost) was measured to win only when the dense term is much wider: 8 x pairs < rows x used slots."""
    return device.type == "cpu" and 8 * pairs < rows * width


def plan_mixture(
    mixes: Sequence[Mix],
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    static: int | None = None,
    form: Form = "auto",
) -> LoraPlan | None:
    """The mixture of a batch whose row i uses `mixes[i]` ((slot, gate weight) pairs); None when no row uses an
    adapter. Pure bookkeeping on the host, one transfer to the device. `static` (the slot count) asks for a
    dense shape a compiled step can reuse: every row in the term (no gather) and the used slots rounded up to
    a power of two (at most `static`). `form` "auto" picks dense or gathered by `gathered_is_cheaper`."""
    used = [i for i, mix in enumerate(mixes) if any(weight != 0.0 for _, weight in mix)]
    if not used or rank == 0:
        return None
    width = 1 + max(slot for i in used for slot, _ in mixes[i])
    if static is not None:
        used, width = list(range(len(mixes))), min(static, 1 << (width - 1).bit_length())
    else:
        pairs = sum(len(mixes[i]) for i in used)
        if form == "gathered" or (form == "auto" and gathered_is_cheaper(device, pairs, len(used), width)):
            return _gathered(mixes, used, len(mixes), rank, dtype, device)
    gates = torch.zeros(len(used), width)
    for row, i in enumerate(used):
        for slot, weight in mixes[i]:
            gates[row, slot] += weight
    scale = gates.repeat_interleave(rank, dim=1).to(device=device, dtype=dtype, non_blocking=True)
    rows = None if len(used) == len(mixes) else torch.tensor(used).to(device, non_blocking=True)
    return LoraPlan(scale, rows)


def _gathered(
    mixes: Sequence[Mix], used: list[int], batch: int, rank: int, dtype: torch.dtype, device: torch.device
) -> LoraPlan:
    """The gathered form: each used row's (slot, gate) pairs, padded to the longest mix with gate 0."""
    width = max(len(mixes[i]) for i in used)
    slots = torch.zeros(len(used), width, dtype=torch.long)
    gates = torch.zeros(len(used), width)
    for row, i in enumerate(used):
        for k, (slot, weight) in enumerate(mixes[i]):
            slots[row, k], gates[row, k] = slot, weight
    scale = gates.repeat_interleave(rank, dim=1).to(device=device, dtype=dtype, non_blocking=True)
    rows = None if len(used) == batch else torch.tensor(used).to(device, non_blocking=True)
    return LoraPlan(scale, rows, slots.to(device, non_blocking=True))


@dataclass
class LoraContext:
    """Routing shared by every MultiLoraLinear for the current forward: a `plan`, or the older per-row form
    `indices`/`weights` ([batch, K] slot indices and gate weights), turned into a plan on first use."""

    plan: LoraPlan | None = None
    indices: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    rank: int = 0
    dtype: torch.dtype = torch.float32
    _derived: tuple[torch.Tensor, torch.Tensor, LoraPlan | None] | None = field(default=None, repr=False)

    def current(self) -> LoraPlan | None:
        indices, weights = self.indices, self.weights
        if self.plan is not None or indices is None or weights is None:
            self._derived = None
            return self.plan
        if self._derived is None or self._derived[0] is not indices or self._derived[1] is not weights:
            rows = zip(indices.tolist(), weights.tolist(), strict=True)
            mixes = [list(zip(slots, gates, strict=True)) for slots, gates in rows]
            self._derived = (indices, weights, plan_mixture(mixes, self.rank, self.dtype, indices.device))
        return self._derived[2]


class MultiLoraLinear(nn.Module):
    """Wraps a base nn.Linear; holds `slots` adapters stacked as A [slots, rank, in] and B·scale
    [slots, rank, out] so the leading k slots read as one [k*rank, in] / [k*rank, out] matrix."""

    def __init__(self, base: nn.Linear, slots: int, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        weight = base.weight
        self.lora_a = nn.Parameter(
            torch.zeros(slots, 0, base.in_features, dtype=weight.dtype, device=weight.device), requires_grad=False
        )
        self.lora_b = nn.Parameter(
            torch.zeros(slots, 0, base.out_features, dtype=weight.dtype, device=weight.device), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        plan = self.context.current()
        if plan is None:
            return y
        rows = plan.rows
        picked = x if rows is None else x.index_select(0, rows)
        shape = (picked.shape[0], -1, picked.shape[-1])
        scale = plan.scale[:, None, :].to(x.dtype)
        if plan.slots is None:  # dense: every row times every used slot, each slot read once
            columns = plan.scale.shape[1]
            a = self.lora_a.view(-1, self.lora_a.shape[-1])[:columns]
            b = self.lora_b.view(-1, self.lora_b.shape[-1])[:columns]
            delta = ((picked.reshape(shape) @ a.T) * scale) @ b
        else:  # gathered: each row times its own slots, copied out of the stacks
            count, flat = plan.slots.shape[0], plan.slots.reshape(-1)
            a = self.lora_a.index_select(0, flat).view(count, -1, self.lora_a.shape[-1])
            b = self.lora_b.index_select(0, flat).view(count, -1, self.lora_b.shape[-1])
            delta = torch.einsum("nti,nci->ntc", picked.reshape(shape), a) * scale
            delta = torch.einsum("ntc,nco->nto", delta, b)
        if rows is None:
            return y + delta.reshape(y.shape)
        return y.index_add(0, rows, delta.reshape(-1, *y.shape[1:]))

    def grow(self, rank: int) -> None:
        """Widens the stacks to `rank` (rare: a larger adapter than any before became resident)."""
        for name in ("lora_a", "lora_b"):
            old: torch.Tensor = getattr(self, name).data
            wider = old.new_zeros(old.shape[0], rank, old.shape[2])
            wider[:, : old.shape[1]] = old
            setattr(self, name, nn.Parameter(wider, requires_grad=False))

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copies one adapter's matrices into `slot` (zeros where it does not target this layer)."""
        self.lora_a.data[slot].zero_()
        self.lora_b.data[slot].zero_()
        if a is not None and b is not None:
            rank = a.shape[0]
            self.lora_a.data[slot, :rank].copy_(a, non_blocking=True)
            self.lora_b.data[slot, :rank].copy_(b.T, non_blocking=True)

    def finite(self, slot: int) -> bool:
        return bool(torch.isfinite(self.lora_a[slot]).all()) and bool(torch.isfinite(self.lora_b[slot]).all())


@dataclass
class MultiLoraModel:
    """The base model with MultiLoraLinear layers installed, plus the shared routing context. `broken` holds
    slots found non-finite at run time (zeroed, refused until rewritten)."""

    model: nn.Module
    layers: dict[str, MultiLoraLinear]
    context: LoraContext
    slots: int
    max_rank: int
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    broken: set[int] = field(default_factory=set)
    form: Form = "auto"  # the LoRA term's form per step (see plan_mixture); tests pin one

    @property
    def rank(self) -> int:
        """Width of the stacks: the largest rank resident so far."""
        return self.context.rank

    @property
    def dtype(self) -> torch.dtype:
        return self.context.dtype

    @property
    def slot_bytes(self) -> int:
        """Device memory one slot takes across all layers."""
        return sum(
            (layer.lora_a[0].numel() + layer.lora_b[0].numel()) * layer.lora_a.element_size()
            for layer in self.layers.values()
        )

    def plan(self, mixes: Sequence[Mix], device: torch.device, static: bool = False) -> LoraPlan | None:
        return plan_mixture(mixes, self.rank, self.dtype, device, self.slots if static else None, self.form)

    @contextmanager
    def mixture(self, mixes: Sequence[Mix], device: torch.device | None = None, static: bool = False) -> Iterator[None]:
        """Serves one forward pass whose row i uses `mixes[i]`; the bare base model outside it. `static`: the
        plan in the fixed shapes a compiled step reuses (see `plan_mixture`)."""
        where = device or next(iter(self.layers.values())).lora_a.device
        self.context.plan = self.plan(mixes, where, static)
        try:
            yield
        finally:
            self.context.plan = None

    def write_slot(self, slot: int, adapter: AdapterWeights | None) -> None:
        if adapter is not None:
            unknown = set(adapter.modules) - set(self.layers)
            if unknown:
                raise AdapterFormatError(f"adapter targets modules not served here: {sorted(unknown)[:3]}")
            if adapter.rank > self.max_rank:
                raise AdapterFormatError(f"adapter rank {adapter.rank} exceeds the served max rank {self.max_rank}")
        with torch.no_grad():
            if adapter is not None and adapter.rank > self.rank:
                for layer in self.layers.values():
                    layer.grow(adapter.rank)
                self.context.rank = adapter.rank
            for name, layer in self.layers.items():
                pair = adapter.modules.get(name) if adapter is not None else None
                layer.write_slot(slot, *(pair if pair is not None else (None, None)))
        self.broken.discard(slot)

    def find_broken(self, slots: set[int]) -> set[int]:
        """Which of `slots` hold non-finite values (written past the load-time check, e.g. by a bad copy);
        those are zeroed and remembered in `broken`. Run only after a step produced non-finite logits."""
        bad = {slot for slot in slots if not all(layer.finite(slot) for layer in self.layers.values())}
        with torch.no_grad():
            for slot in bad:
                for layer in self.layers.values():
                    layer.write_slot(slot, None, None)
        self.broken |= bad
        return bad


def install_multi_lora(model: nn.Module, target_modules: list[str], slots: int, max_rank: int) -> MultiLoraModel:
    """Replaces every nn.Linear whose last name part is in `target_modules` by a MultiLoraLinear."""
    dtype = next(model.parameters()).dtype
    context = LoraContext(dtype=dtype)
    layers: dict[str, MultiLoraLinear] = {}
    shapes: dict[str, tuple[int, int]] = {}
    targets = set(target_modules)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = MultiLoraLinear(module, slots, context)
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
