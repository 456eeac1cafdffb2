"""Admission by KV budget: how many waiting requests may join the batch, and how large the budget is.

The engine's batch cache is left-padded, so it holds rows x the longest row. A request reserves its
prompt plus `max_tokens`; rows join only while (rows + 1) x the longest reservation fits the budget, so a
step can never allocate more KV than the budget instead of running out of memory mid-batch."""

from __future__ import annotations

import os
from typing import Any

import torch

AUTO_FRACTION = 0.5  # of the memory free once the model and the adapter slots are loaded


def admissible(running: list[int], waiting: list[int], room: int, budget: int) -> int:
    """How many of `waiting` (reserved lengths, in queue order) may join rows reserving `running`: rows x
    the longest reservation must stay within `budget` tokens, and no more than `room` rows join."""
    rows, longest, count = len(running), max(running, default=0), 0
    for length in waiting[:room]:
        longest = max(longest, length)
        if (rows + count + 1) * longest > budget:
            break
        count += 1
    return count


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Bytes of keys and values one token takes across all layers of a decoder."""
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return 2 * int(config.num_hidden_layers) * heads * head_dim * element_size


def auto_budget(bytes_per_token: int, free_bytes: int, rows: int, row_tokens: int) -> int:
    """The budget when none is configured: every row at its longest (`rows` x `row_tokens`), but no more than
    half the free memory holds."""
    return max(row_tokens, min(rows * row_tokens, int(AUTO_FRACTION * free_bytes) // max(1, bytes_per_token)))


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now (CUDA: the driver's count; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
