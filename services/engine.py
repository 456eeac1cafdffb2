"""The decode loop: one thread owns the model and runs continuous batching over a request queue.

Waiting requests are prefilled together (left-padded) in chunks of `prefill_chunk` columns, one chunk per
engine step, interleaved with the running rows' decode steps (so a long prompt never stalls them for its
whole prefill), and merged into the running batch's KV cache after their last chunk; finished rows leave
the batch at once, so a long request never holds up short ones. Decoding runs over fixed-shape per-row KV
slots (services/kvslots.py): each row's step is written in place at its own position, a finished row only
frees its slot, and step shapes change only between batch-size and length buckets.
Every row carries its own adapter mix (slots + gate weights), so one forward pass serves a batch that
mixes any number of adapters. The thread holds `step_lock` for each step; adapter slot writes and
callers that need the raw model take the same lock, so they never race a forward pass.

Admission is by a KV budget in tokens (services/admission.py); requests that do not fit yet queue.
A step whose logits are non-finite is diagnosed: if an adapter slot it used holds non-finite values
(written past the load-time check), that slot is quarantined, the rows using it fail, and the step is
run again for the others from the cache as it was before the step; otherwise the non-finite rows fail
alone (their own activations overflowed)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from latentmas.chat import end_of_turn_ids, pad_token_id
from latentmas.services import kvbatch
from latentmas.services.admission import admissible
from latentmas.services.detokenize import StreamDetokenizer
from latentmas.services.kvslots import RowSlots
from latentmas.services.lora import MultiLoraModel
from latentmas.services.sampling import SamplingParams, sample_next, stop_cut
from transformers import DynamicCache, PreTrainedTokenizerBase

log = logging.getLogger("latentmas.services.engine")
NON_FINITE = "the model produced non-finite logits for this request"
BROKEN_SLOT = f"{NON_FINITE} (its adapter's device weights turned non-finite and were quarantined)"


Compiler = Callable[[torch.nn.Module], Callable[..., Any]]
"""Wraps the model for decode steps, e.g. `torch.compile(mode="reduce-overhead")` (see `decode_compiler`)."""


def decode_compiler(setting: str, device: torch.device) -> Compiler | None:
    """The decode compiler a `compile_decode` setting asks for: "auto" = CUDA graphs via
    `torch.compile(mode="reduce-overhead")` on CUDA and eager elsewhere, "off", or a torch.compile mode
    ("reduce-overhead", "default", "max-autotune") on any device."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    mode = "reduce-overhead" if setting == "auto" else setting
    if mode not in ("reduce-overhead", "default", "max-autotune"):
        raise ValueError(f"compile_decode: {setting!r} is not auto, off, reduce-overhead, default or max-autotune")

    def compile_model(model: torch.nn.Module) -> Callable[..., Any]:
        return torch.compile(model, mode=mode)

    return compile_model


class StepObserver(Protocol):
    def batch(self, size: int, prefill: bool) -> None: ...
    def tokens_done(self, prompt: int, completion: int) -> None: ...


@dataclass
class Sequence:
    """One request inside the engine. `on_text(delta)` and `on_done(reason)` are called from the engine
    thread; the async layer turns them into queue items. `on_done` gets "stop", "length", "cancelled"
    or "error: <why>" (this row failed; the rest of the batch goes on)."""

    prompt_ids: list[int]
    params: SamplingParams
    mix: list[tuple[int, float]]
    on_text: Callable[[str], None]
    on_done: Callable[[str], None]
    output_ids: list[int] = field(default_factory=list)
    emitted: int = 0
    cancelled: bool = False
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    detok: StreamDetokenizer | None = None


@dataclass
class Prefill:
    """Joining rows whose prompts are being prefilled chunk by chunk: left-padded ids, mask and positions, their
    own cache, and how many columns are done. They join the running batch after the last chunk."""

    rows: list[Sequence]
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache
    done: int = 0

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])


def reserved_tokens(seq: Sequence) -> int:
    """KV positions a request may need: its prompt plus every token it may generate."""
    return len(seq.prompt_ids) + seq.params.max_tokens


class Engine:
    """Continuous-batching generator over a MultiLoraModel."""

    def __init__(
        self,
        lora: MultiLoraModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int,
        observer: StepObserver | None = None,
        seed: int = 0,
        kv_budget_tokens: int | None = None,
        prefill_chunk: int = 512,
        compile_decode: Compiler | None = None,
    ) -> None:
        self.lora = lora
        self.model = lora.model
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        self.max_batch_size = max_batch_size
        self.kv_budget_tokens = kv_budget_tokens or 2**62
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._decoder: Callable[..., Any] = compile_decode(self.model) if compile_decode else self.model
        self.compiled = compile_decode is not None
        self.observer = observer
        self.step_lock = threading.RLock()
        self.eos_ids = end_of_turn_ids(tokenizer, self.model)
        self.pad_id = pad_token_id(tokenizer)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._pending: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._rows: list[Sequence] = []
        self._joining: Prefill | None = None
        self._slots = self._new_slots()
        self._row_slots: list[int] = []  # the KV slot of each row of _rows
        self._index = torch.zeros(0, dtype=torch.long, device=self.device)  # the same, on the device
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="latentmas-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Requests not decoding yet: waiting for admission or in a chunked prefill."""
        return len(self._pending) + (len(self._joining.rows) if self._joining else 0)

    def submit(self, seq: Sequence) -> None:
        if seq.detok is None:
            seq.detok = StreamDetokenizer(self.tokenizer)
        with self._wake:
            self._pending.append(seq)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._pending and not self._rows and self._joining is None:
                    self._wake.wait(timeout=1.0)
                if self._stopped:
                    break
            joining: list[Sequence] = []
            try:
                with self.step_lock, torch.inference_mode():
                    with self._wake:  # admitted with the model in hand: everything that queued meanwhile joins
                        joining = self._admit() if self._joining is None else []
                    if joining:
                        self._joining = self._start_prefill(joining)
                    if self._joining is not None:
                        self._prefill_chunk(self._joining)
                    if self._rows:
                        self._decode()
            except Exception as err:  # a failed step must not kill the server: fail the batch, keep serving
                log.exception("engine step failed")
                group = self._joining.rows if self._joining else joining
                for seq in self._rows + group:
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.on_done(f"error: {err}")
                self._reset()
        for seq in self._rows + (self._joining.rows if self._joining else []) + list(self._pending):
            seq.on_done("error: engine stopped")

    def _admit(self) -> list[Sequence]:
        """Takes the waiting requests that fit the batch and the KV budget (queue order); a request that
        could never fit fails at once (the server refuses those before they get here). Caller holds _wake."""
        while self._pending and reserved_tokens(self._pending[0]) > self.kv_budget_tokens:
            seq = self._pending.popleft()
            seq.finish_reason = "error"
            seq.on_done(
                f"error: prompt + max_tokens = {reserved_tokens(seq)} exceeds the KV budget of "
                f"{self.kv_budget_tokens} tokens"
            )
        count = admissible(
            [reserved_tokens(s) for s in self._rows + (self._joining.rows if self._joining else [])],
            [reserved_tokens(s) for s in self._pending],
            self.max_batch_size - len(self._rows),
            self.kv_budget_tokens,
        )
        return [self._pending.popleft() for _ in range(count)]

    def _reset(self) -> None:
        self._rows, self._row_slots, self._joining = [], [], None
        self._slots = self._new_slots()
        self._index = self._index[:0]

    def _new_slots(self) -> RowSlots:
        return RowSlots(self.device, self.model.config, self.pad_id, static_addresses=self.compiled)

    def _forward(
        self,
        rows: list[Sequence] | list[Sequence | None],
        ids: torch.Tensor,
        mask: Any,
        positions: torch.Tensor,
        cache: DynamicCache,
        decode: bool = False,
    ) -> torch.Tensor:
        """Last-position logits of one forward; `rows` gives each batch row's adapter mix (None: a free slot).
        A decode step goes through the compiled model when there is one (with the LoRA plan in fixed shapes);
        if compiling or running it fails, the engine logs why and decodes eagerly from then on."""
        mixes = [[] if seq is None or seq.finish_reason is not None else seq.mix for seq in rows]
        compiled = decode and self.compiled
        with self.lora.mixture(mixes, self.device, static=compiled):
            if compiled:
                try:
                    return self._last_logits(ids, mask, positions, cache, self._decoder)
                except Exception:
                    log.exception("compiled decode failed; decoding eagerly from now on")
                    self._decoder, self.compiled = self.model, False
            return self._last_logits(ids, mask, positions, cache, self.model)

    @staticmethod
    def _last_logits(
        ids: torch.Tensor, mask: Any, positions: torch.Tensor, cache: DynamicCache, model: Callable[..., Any]
    ) -> torch.Tensor:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _quarantine(self, rows: list[Sequence]) -> bool:
        """After non-finite logits: finds adapter slots holding non-finite values among those the step's dense
        LoRA term read (every slot up to the highest one used: a broken slot spoils every adapter row, not
        only its own), zeroes them and fails every request using them, running or joining. True when the
        step must run again for the others."""
        used = [slot for seq in rows if seq.finish_reason is None for slot, _ in seq.mix]
        bad = self.lora.find_broken(set(range(max(used) + 1))) if used else set()
        if not bad:
            return False
        log.error("adapter slot(s) %s held non-finite values at run time; quarantined", sorted(bad))
        for seq in self._rows + rows:
            if seq.finish_reason is None and any(slot in bad for slot, _ in seq.mix):
                seq.finish_reason, seq.error = "error", BROKEN_SLOT
        return True

    def _start_prefill(self, joining: list[Sequence]) -> Prefill:
        for seq in joining:
            if any(slot in self.lora.broken for slot, _ in seq.mix):
                seq.finish_reason, seq.error = "error", BROKEN_SLOT
        width = max(len(s.prompt_ids) for s in joining)
        ids = torch.full((len(joining), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(joining), width, dtype=torch.long)
        for i, seq in enumerate(joining):
            ids[i, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[i, width - len(seq.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        return Prefill(joining, ids, mask, positions, kvbatch.new_cache())

    def _prefill_chunk(self, prefill: Prefill) -> None:
        """Runs the next `prefill_chunk` columns of the joining rows; after the last one, samples their first
        tokens and merges them into the running batch. A broken adapter slot found then fails its rows, and
        the others start their prefill again (their cache read the slot)."""
        start, end = prefill.done, min(prefill.done + self.prefill_chunk, prefill.width)
        joining = prefill.rows
        logits = self._forward(
            joining, prefill.ids[:, start:end], prefill.mask[:, :end], prefill.positions[:, start:end], prefill.cache
        )
        prefill.done = end
        if self.observer:
            self.observer.batch(len(joining), prefill=True)
        if end < prefill.width:
            return
        tokens, finite = self._sample(logits, joining)
        host = torch.stack([tokens, finite.long()]).tolist()  # the step's one host sync
        if not all(host[1]) and self._quarantine(joining):
            for seq in joining:
                if seq.finish_reason is not None:
                    seq.on_done(f"error: {seq.error}")
            healthy = [seq for seq in joining if seq.finish_reason is None]
            self._joining = self._start_prefill(healthy) if healthy else None
            return
        self._joining = None
        if self.observer:
            self.observer.tokens_done(prompt=sum(len(s.prompt_ids) for s in joining), completion=0)
        self._place(joining, self._slots.join(prefill.cache, prefill.mask, tokens))
        self._advance(host, first=len(self._rows) - len(joining))

    def _place(self, rows: list[Sequence], slots: list[int]) -> None:
        """Adds rows (already in their KV slots) to the running batch."""
        self._rows += rows
        self._row_slots += slots
        self._index = torch.tensor(self._row_slots, dtype=torch.long, device=self.device)

    def _decode(self) -> None:
        ids, positions, mask, cache, rows = self._slots.step()
        by_slot: list[Sequence | None] = [None] * rows
        for seq, slot in zip(self._rows, self._row_slots, strict=True):
            by_slot[slot] = seq
        while True:  # a re-run rewrites the same positions: nothing to restore
            logits = self._forward(by_slot, ids, mask, positions, cache, decode=True).index_select(0, self._index)
            tokens, finite = self._sample(logits, self._rows)
            host = torch.stack([tokens, finite.long()]).tolist()  # the step's one host sync
            if all(host[1]) or not self._quarantine(self._rows):
                break
        if self.observer:
            self.observer.batch(len(self._rows), prefill=False)
        self._slots.advance(self._index, tokens)
        self._advance(host, first=0)

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens, and which rows had finite logits: a row with NaN/inf logits (e.g. a broken adapter)
        samples from zeros here and is ended with an error by `_advance`, so it never fails its batch."""
        finite = torch.isfinite(logits).all(dim=-1)
        logits = torch.where(finite[:, None], logits, torch.zeros_like(logits))
        return sample_next(logits, [s.params for s in rows], self.generator), finite

    def _advance(self, host: list[list[int]], first: int) -> None:
        """Appends each row's new token, streams its newly complete text, and drops rows that are done.
        `host`: the sampled tokens and per-row finiteness, already on the host."""
        tokens, healthy = host
        completed = 0
        for seq, token, ok in zip(self._rows[first:], tokens, healthy, strict=True):
            if seq.finish_reason is not None:
                continue
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                continue
            if not ok:
                seq.finish_reason, seq.error = "error", NON_FINITE
                continue
            safe = len(seq.text)
            if token in self.eos_ids:
                seq.finish_reason = "stop"
            else:
                assert seq.detok is not None
                seq.output_ids.append(token)
                completed += 1
                seq.detok.push(token)
                text = seq.detok.text
                cut, held = stop_cut(text[seq.emitted :], seq.params.stop)
                if cut is not None:
                    seq.finish_reason, text, safe = "stop", text[: seq.emitted + cut], seq.emitted + cut
                else:
                    safe = seq.emitted + held
                    if len(seq.output_ids) >= seq.params.max_tokens:
                        seq.finish_reason, safe = "length", len(text)
                seq.text = text
            if safe > seq.emitted:
                seq.on_text(seq.text[seq.emitted : safe])
                seq.emitted = safe
        if self.observer:
            self.observer.tokens_done(prompt=0, completion=completed)
        keep = [i for i, seq in enumerate(self._rows) if seq.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        for seq in self._rows:
            if seq.finish_reason is not None:
                seq.on_done(f"error: {seq.error}" if seq.finish_reason == "error" else seq.finish_reason)
        self._slots.leave([slot for i, slot in enumerate(self._row_slots) if i not in set(keep)])
        rows, slots = [self._rows[i] for i in keep], [self._row_slots[i] for i in keep]
        self._rows, self._row_slots = [], []
        self._place(rows, slots)

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` with the model to itself (between decode steps), e.g. for router features."""
        with self.step_lock, torch.inference_mode():
            return fn()
