"""KV-cache bookkeeping for continuous batching with left padding: rows join (prefilled separately, then
merged) and leave (selected out) between decode steps, and all-padding columns are trimmed away."""

from __future__ import annotations

import torch
from transformers import DynamicCache


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
    return DynamicCache(ddp_cache_data=pairs), merged_mask


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
    return DynamicCache(ddp_cache_data=pairs), mask[:, start:]
