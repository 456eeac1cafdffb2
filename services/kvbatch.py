"""The KV cache of a chunked prefill: joining rows are prefilled left-padded, a chunk of columns per engine
step, into a cache whose layers keep keys and values in buffers with spare columns and write each chunk in
place (`SpareColumnsLayer`), growing by a quarter (at least 64 columns) when full, so a chunk never copies
what earlier chunks cached. After the last chunk the rows are copied into their decode slots
(services/kvslots.py)."""

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
