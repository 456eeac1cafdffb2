"""Fixed-shape per-row KV for decoding: every running row owns a slot of preallocated key/value buffers and
its tokens sit at positions 0..length-1 of that slot (no left padding, no shared columns).

A decode step feeds one token per slot of a batch-size bucket (the power of two covering the highest
slot in use; free slots below it decode a dummy token that nobody reads) and attends over a length
bucket (the longest row rounded up to `LENGTH_STEP`); each layer writes the step's key and value into
each row's own position in place. So within a bucket every step has the same shapes, a finished row
only frees its slot (no copy of the others) and a joining row is copied into a free slot once. The
buffers grow (rows to the next power of two, length by a quarter) only when a join or a step needs
more room. Masks are 4-D and built here: each row sees its own positions up to the one being written,
within the model's sliding window where it has one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

LENGTH_STEP = 64


def bucket(rows: int) -> int:
    """The batch-size bucket for `rows` rows: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass
class StepView:
    """What one decode step reads and writes: `rows` slots, `columns` positions of each."""

    rows: int
    columns: int
    write_rows: torch.Tensor
    write_positions: torch.Tensor


class SlotLayer(DynamicLayer):
    """One layer's view of the slot buffers for a step: `update` writes each row's new key/value at its own
    position in place and returns the step's [rows, heads, columns, dim] views."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, view: StepView) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer, self.view = keys, values, view
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        view = self.view
        self.key_buffer[view.write_rows, :, view.write_positions] = key_states[:, :, 0, :]
        self.value_buffer[view.write_rows, :, view.write_positions] = value_states[:, :, 0, :]
        self.keys = self.key_buffer[: view.rows, :, : view.columns]
        self.values = self.value_buffer[: view.rows, :, : view.columns]
        return self.keys, self.values

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.view.columns - 1


def _layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(f"cache layer {type(layer).__name__} holds no key/value tensors")
        pairs.append((keys, values))
    return pairs


class RowSlots:
    """The slot buffers of every layer plus, per slot, the cached length and the next token to feed (on the
    device, so a step needs no host data but the rows' adapter mixes)."""

    def __init__(self, device: torch.device, config: Any, pad_id: int, static_addresses: bool = False) -> None:
        self.device = device
        self.pad_id = pad_id
        self.static_addresses = static_addresses  # compiled decode: CUDA graphs may write the buffers in place
        implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"attention implementation {implementation!r}: the engine's 4-D masks need sdpa or eager")
        self.additive = implementation == "eager"
        self.window: int | None = getattr(config, "sliding_window", None)
        types = set(getattr(config, "layer_types", None) or [])
        self.mixed = {"full_attention", "sliding_attention"} <= types
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.lengths: list[int] = []  # cached tokens per slot; -1 = free
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self.last = torch.zeros(0, dtype=torch.long, device=device)
        self.active = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) the buffers hold."""
        if not self.buffers:
            return 0, 0
        keys = self.buffers[0][0]
        return int(keys.shape[0]), int(keys.shape[2])

    def used(self) -> list[int]:
        return [slot for slot, length in enumerate(self.lengths) if length >= 0]

    def _grow(self, rows: int, columns: int, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Buffers of at least `rows` x `columns`, keeping what is cached (new tensors, so a step's views of the
        old ones stay valid)."""
        have_rows, have_columns = self.capacity
        if rows <= have_rows and columns <= have_columns:
            return
        rows = max(rows, have_rows)
        if columns > have_columns:
            columns = _round_up(max(columns, have_columns + have_columns // 4), LENGTH_STEP)
        else:
            columns = have_columns
        grown = []
        for index, (keys, values) in enumerate(like):
            pair: list[torch.Tensor] = []
            for source in (keys, values):
                buffer = source.new_zeros((rows, source.shape[1], columns, source.shape[3]))
                if self.buffers:
                    old = self.buffers[index][len(pair)]
                    buffer[: old.shape[0], :, : old.shape[2]].copy_(old)
                if self.static_addresses:
                    torch._dynamo.mark_static_address(buffer)
                pair.append(buffer)
            grown.append((pair[0], pair[1]))
        self.buffers = grown
        extra = rows - len(self.lengths)
        if extra > 0:
            self.lengths += [-1] * extra
            zeros = torch.zeros(extra, dtype=torch.long, device=self.device)
            self.positions = torch.cat([self.positions, zeros])
            self.last = torch.cat([self.last, zeros + self.pad_id])
            self.active = torch.cat([self.active, zeros])

    def join(self, cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor) -> list[int]:
        """Copies left-padded prefilled rows (`cache`, `mask`: [rows, width]) into free slots, lowest first, with
        `tokens` as each one's next input; returns the slots in row order."""
        lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        free = [slot for slot, length in enumerate(self.lengths) if length < 0]
        needed = len(lengths) - len(free)
        if needed > 0:
            free += list(range(len(self.lengths), len(self.lengths) + needed))
        slots = free[: len(lengths)]
        pairs = _layer_tensors(cache)
        longest = max(self.lengths + lengths)
        self._grow(bucket(max(slots) + 1), longest + 1, pairs)
        width = int(mask.shape[1])
        # row i's tokens are its last lengths[i] columns: gather them to positions 0..lengths[i]-1
        offsets = torch.tensor([width - n for n in lengths], device=self.device)
        span = max(lengths)
        columns = (offsets[:, None] + torch.arange(span, device=self.device)[None, :]).clamp_max(width - 1)
        index = torch.tensor(slots, device=self.device)
        for (keys, values), (key_buffer, value_buffer) in zip(pairs, self.buffers, strict=True):
            for source, target in ((keys, key_buffer), (values, value_buffer)):
                gathered = source.gather(2, columns[:, None, :, None].expand(-1, source.shape[1], -1, source.shape[3]))
                target[index, :, :span] = gathered
        for slot, length in zip(slots, lengths, strict=True):
            self.lengths[slot] = length
        self.positions[index] = torch.tensor(lengths, device=self.device)
        self.last[index] = tokens
        self.active[index] = 1
        return slots

    def leave(self, slots: list[int]) -> None:
        """Frees slots (bookkeeping; their buffers are rewritten by the next row that joins there)."""
        if not slots:
            return
        for slot in slots:
            self.lengths[slot] = -1
        index = torch.tensor(slots, device=self.device)
        self.active[index] = 0
        self.positions[index] = 0

    def step(self) -> tuple[torch.Tensor, torch.Tensor, Any, DynamicCache, int]:
        """Inputs of one decode step over the slot bucket: ids, position ids, the attention mask (or per layer
        type masks), the cache whose layers write in place, and the bucket's row count."""
        used = self.used()
        rows = bucket(max(used) + 1)
        longest = max(self.lengths[slot] for slot in used)
        if longest + 1 > self.capacity[1] or rows > self.capacity[0]:
            self._grow(rows, longest + 1, self.buffers)
        columns = min(_round_up(longest + 1, LENGTH_STEP), self.capacity[1])
        positions = self.positions[:rows]
        view = StepView(rows, columns, torch.arange(rows, device=self.device), positions)
        cache = DynamicCache()
        cache.layers = [SlotLayer(keys, values, view) for keys, values in self.buffers]
        return self.last[:rows, None], positions[:, None], self._mask(positions, columns), cache, rows

    def _mask(self, positions: torch.Tensor, columns: int) -> Any:
        """Each row sees its positions up to the one it writes (and, in sliding layers, the last `window`)."""
        seen = torch.arange(columns, device=self.device)[None, :]
        full = seen <= positions[:, None]
        sliding = full & (seen > positions[:, None] - self.window) if self.window else full
        masks = {"full_attention": self._form(full), "sliding_attention": self._form(sliding)}
        if self.mixed:
            return masks
        return masks["sliding_attention"] if self.window else masks["full_attention"]

    def _form(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = allowed[:, None, None, :]
        if not self.additive:
            return mask
        dtype = self.buffers[0][0].dtype
        return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)

    def advance(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """After a step that succeeded: each used slot's cache grew by one token; `tokens` are its next inputs."""
        rows = len(self.positions)
        self.positions += self.active[:rows]
        self.last[slots] = tokens
        for slot in self.used():
            self.lengths[slot] += 1
