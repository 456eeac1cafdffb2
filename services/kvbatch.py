"""KV-cache bookkeeping for continuous batching with left padding: rows join (prefilled separately, then
merged) and leave (selected out) between decode steps, and all-padding columns are trimmed away.

Decode never concatenates: each layer keeps its keys and values in a buffer with spare columns and writes
a step's token in place (`SpareColumnsLayer`), so the per-step cost is one small write, not a copy of the
whole cache; buffers grow by a quarter (at least 64 columns) when full, and joins and finishes rebuild
them once (the rows change), not once per step."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 64


class SpareColumnsLayer(DynamicLayer):
    """A full-attention cache layer whose `keys`/`values` are views of longer buffers; `update` writes the new
    columns in place and only reallocates (with spare room) when the buffer is full."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if self.key_buffer is None or self.value_buffer is None or end > self.key_buffer.shape[-2]:
            self._reallocate(end + max(MIN_SPARE, end // 4), key_states, value_states)
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[..., start:end, :].copy_(key_states)
        self.value_buffer[..., start:end, :].copy_(value_states)
        self.length = end
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _reallocate(self, columns: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New buffers with room for `columns` positions, holding what is cached so far (new tensors: views
        handed out earlier, e.g. a step's restore point, stay valid)."""
        buffers = []
        for old, new in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
            shape = (*new.shape[:-2], columns, new.shape[-1])
            buffer = new.new_empty(shape)
            if old is not None and self.length:
                buffer[..., : self.length, :].copy_(old[..., : self.length, :])
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers


def new_cache() -> DynamicCache:
    """An empty batch cache whose layers write decode steps in place."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = SpareColumnsLayer
    cache.layers = []
    return cache


def _from_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = new_cache()
    for keys, values in pairs:
        layer = SpareColumnsLayer()
        layer.update(keys, values)
        cache.layers.append(layer)
    return cache


def _layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(f"cache layer {type(layer).__name__} holds no key/value tensors")
        pairs.append((keys, values))
    return pairs


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(
    cache: DynamicCache | None, mask: torch.Tensor | None, new_cache: DynamicCache, new_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Appends the rows of (new_cache, new_mask) below (cache, mask), left-padding the shorter one."""
    if cache is None or mask is None:
        return new_cache, new_mask
    length = max(mask.shape[1], new_mask.shape[1])
    pairs = [
        (
            torch.cat([_left_pad(k, length, 2), _left_pad(nk, length, 2)], dim=0),
            torch.cat([_left_pad(v, length, 2), _left_pad(nv, length, 2)], dim=0),
        )
        for (k, v), (nk, nv) in zip(_layer_tensors(cache), _layer_tensors(new_cache), strict=True)
    ]
    merged_mask = torch.cat([_left_pad(mask, length, 1), _left_pad(new_mask, length, 1)], dim=0)
    return _from_pairs(pairs), merged_mask


def select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Keeps only rows `keep`, then drops leading columns that are padding in every remaining row."""
    index = torch.tensor(keep, device=mask.device, dtype=torch.long)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    pairs = [
        (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
        for k, v in _layer_tensors(cache)
    ]
    return _from_pairs(pairs), mask[:, start:]
