"""Adapter residency: N device slots (the MultiLoraModel's stacks), an LRU pinned-CPU tier and a disk
tier, with reference counts so a slot is never rewritten while a request still decodes with it.

Versions are part of the key (`name`, `version`), so publishing v2 of an expert never serves stale v1
weights under the new name, and v1's slot is freed as soon as its last request ends.

The cache lock only guards bookkeeping and is never held while waiting for the model (`step_lock`): a
slot is claimed under the cache lock (marked loading, pinned by the claimer), written under the model
lock alone, then marked ready; requests for a version still loading wait on its event, not on a lock."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from latentmas.services.lora import AdapterWeights, MultiLoraModel, load_peft_adapter

AdapterKey = tuple[str, int]


class NoFreeSlot(RuntimeError):
    """Every device slot is held by running requests; the caller should retry shortly."""


class UnknownAdapter(KeyError):
    """No active version of that adapter name."""


class CacheObserver(Protocol):
    def adapter_event(self, event: str) -> None: ...


@dataclass
class Slot:
    key: AdapterKey | None = None
    refs: int = 0
    last_used: float = 0.0
    loading: threading.Event | None = None  # set once the weights are written (or the write failed)
    failed: str | None = None


@dataclass
class Lease:
    """The adapters one request holds: (name, version, weight) and the slot mix the engine uses."""

    experts: list[tuple[str, int, float]]
    mix: list[tuple[int, float]]
    released: bool = False


@dataclass
class AdapterCache:
    lora: MultiLoraModel
    step_lock: threading.RLock
    fetch: Callable[[str, int], Path]
    cpu_capacity: int = 16
    pin_memory: bool = False
    observer: CacheObserver | None = None
    slots: list[Slot] = field(init=False)
    cpu: OrderedDict[AdapterKey, AdapterWeights] = field(init=False, default_factory=OrderedDict)
    disk: dict[AdapterKey, Path] = field(init=False, default_factory=dict)
    active: dict[str, int] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.slots = [Slot() for _ in range(self.lora.slots)]

    def _event(self, name: str) -> None:
        if self.observer:
            self.observer.adapter_event(name)

    def stage(self, name: str, version: int) -> AdapterWeights:
        """Brings a version into the CPU tier (downloading and checking it if needed); raises on a bad
        adapter without touching what is served."""
        key = (name, version)
        with self._lock:
            if key in self.cpu:
                self.cpu.move_to_end(key)
                return self.cpu[key]
        folder = self.disk.get(key) or self.fetch(name, version)
        weights = self._serving_form(load_peft_adapter(folder, self.lora.shapes))
        if weights.rank > self.lora.max_rank:
            raise ValueError(f"adapter {name} v{version}: rank {weights.rank} > served max rank {self.lora.max_rank}")
        with self._lock:
            self.disk[key] = folder
            self.cpu[key] = weights
            self.cpu.move_to_end(key)
            while len(self.cpu) > self.cpu_capacity:
                self.cpu.popitem(last=False)
                self._event("cpu_evict")
        return weights

    def _serving_form(self, weights: AdapterWeights) -> AdapterWeights:
        """The CPU-tier copy in the model's dtype (pinned on CUDA), converted here, outside every lock, so a
        slot write under the model lock is a plain copy."""
        dtype = self.lora.dtype

        def ready(tensor: torch.Tensor) -> torch.Tensor:
            converted = tensor.to(dtype)
            return converted.pin_memory() if self.pin_memory else converted

        weights.modules = {m: (ready(a), ready(b)) for m, (a, b) in weights.modules.items()}
        return weights

    def _slot_of(self, key: AdapterKey) -> int | None:
        return next((i for i, s in enumerate(self.slots) if s.key == key), None)

    def _claim(self, key: AdapterKey) -> tuple[int, bool]:
        """Slot for `key`, pinned once more for the caller, and whether the caller must write it (a new claim
        of a free or least-recently-used idle slot, or a quarantined slot nobody holds). Caller holds _lock."""
        found = self._slot_of(key)
        if found is not None:
            slot = self.slots[found]
            heal = found in self.lora.broken and slot.refs == 0 and slot.loading is None
            self._event("miss" if heal else "hit")
            if heal:
                slot.loading = threading.Event()
            slot.refs += 1
            slot.last_used = time.monotonic()
            return found, heal
        self._event("miss")
        idle = [i for i, s in enumerate(self.slots) if s.refs == 0 and s.loading is None]
        if not idle:
            raise NoFreeSlot(f"all {len(self.slots)} adapter slots are busy")
        empty = [i for i in idle if self.slots[i].key is None]
        index = empty[0] if empty else min(idle, key=lambda i: self.slots[i].last_used)
        if self.slots[index].key is not None:
            self._event("evict")
        self.slots[index] = Slot(key=key, refs=1, last_used=time.monotonic(), loading=threading.Event())
        return index, True

    def _fill(self, index: int, key: AdapterKey) -> None:
        """Writes `key`'s weights into the claimed slot `index` under the model lock only, then marks it ready
        (or failed, freeing it, when the weights cannot be had)."""
        slot = self.slots[index]
        try:
            weights = self.cpu.get(key) or self._serving_form(load_peft_adapter(self.disk[key], self.lora.shapes))
            with self.step_lock:
                self.lora.write_slot(index, weights)
        except Exception as err:
            with self._lock:
                slot.failed, slot.refs = str(err), slot.refs - 1
                self.slots[index] = Slot()
                assert slot.loading is not None
                slot.loading.set()
            raise
        with self._lock:
            self.cpu.setdefault(key, weights)
            assert slot.loading is not None
            slot.loading.set()
            slot.loading = None
        self._event("load")

    def _wait_ready(self, index: int, slot: Slot) -> None:
        """Blocks (holding no lock) until another caller finished writing `slot`; raises if that failed."""
        event = slot.loading
        if event is not None:
            event.wait()
        if slot.failed is not None:
            raise RuntimeError(f"adapter slot {index} failed to load: {slot.failed}")

    def activate(self, name: str, version: int) -> None:
        """Stages, prefetches into a slot when one is idle, then switches new requests to `version`."""
        self.stage(name, version)
        key = (name, version)
        claimed: tuple[int, bool] | None = None
        with self._lock, contextlib.suppress(NoFreeSlot):  # all slots busy: loaded on first use instead
            claimed = self._claim(key)
        if claimed is not None:
            index, write = claimed
            try:
                if write:
                    self._fill(index, key)
                else:
                    self._wait_ready(index, self.slots[index])
            finally:
                with self._lock:
                    if self.slots[index].key == key:
                        self.slots[index].refs -= 1
        with self._lock:
            previous = self.active.get(name)
            self.active[name] = version
            if previous is not None and previous != version:
                self._free_if_unused((name, previous))
                self._drop_tiers((name, previous))

    def _drop_tiers(self, key: AdapterKey) -> None:
        """A superseded version leaves the CPU and disk tiers (a rollback downloads it again), so hundreds of
        reloads do not grow memory or disk; its device slot, if still busy, is freed by release()."""
        self.cpu.pop(key, None)
        folder = self.disk.pop(key, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def deactivate(self, name: str) -> None:
        with self._lock:
            version = self.active.pop(name, None)
            if version is None:
                raise UnknownAdapter(name)
            self._free_if_unused((name, version))

    def _free_if_unused(self, key: AdapterKey) -> None:
        """Forgets a superseded version's slot once nobody holds it (no model access: a slot no row uses is
        never read with a non-zero gate, and the next claim overwrites it)."""
        index = self._slot_of(key)
        slot = self.slots[index] if index is not None else None
        idle = slot is not None and slot.refs == 0 and slot.loading is None
        if index is not None and idle and self.active.get(key[0]) != key[1]:
            self.slots[index] = Slot()
            self._event("unload")

    def acquire(self, weighted: list[tuple[str, float]]) -> Lease:
        """Pins the active version of each named adapter in a slot for one request; slots it claims are
        written outside the cache lock, and slots another caller is writing are waited for."""
        experts: list[tuple[str, int, float]] = []
        mix: list[tuple[int, float]] = []
        claims: list[tuple[int, bool, Slot]] = []
        with self._lock:
            for name, _ in weighted:
                if name not in self.active:
                    raise UnknownAdapter(name)
            try:
                for name, weight in weighted:
                    version = self.active[name]
                    index, write = self._claim((name, version))
                    claims.append((index, write, self.slots[index]))
                    experts.append((name, version, weight))
                    mix.append((index, weight))
            except Exception:
                self._unpin(claims)
                raise
        lease = Lease(experts, mix)
        try:
            for (index, write, slot), (name, version, _) in zip(claims, experts, strict=True):
                if write:
                    self._fill(index, (name, version))
                else:
                    self._wait_ready(index, slot)
        except Exception:
            with self._lock:
                self._unpin([c for c in claims if c[2].failed is None])
            raise
        return lease

    def _unpin(self, claims: list[tuple[int, bool, Slot]]) -> None:
        """Drops the caller's pins of slots it claimed but will not use (a later claim failed). Caller holds
        _lock; a claimed slot never written is released for reuse."""
        for index, write, slot in claims:
            slot.refs -= 1
            if write and slot.loading is not None and not slot.loading.is_set():
                slot.failed = "claim abandoned"
                slot.loading.set()
                self.slots[index] = Slot()

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            for (name, version, _), (index, _) in zip(lease.experts, lease.mix, strict=True):
                self.slots[index].refs -= 1
                self._free_if_unused((name, version))

    def stats(self) -> dict[str, Any]:
        """Residency and memory accounting, as /adapters reports it."""
        with self._lock:
            slot_bytes = self.lora.slot_bytes
            return {
                "slots": {
                    "total": len(self.slots),
                    "used": sum(1 for s in self.slots if s.key is not None),
                    "busy": sum(1 for s in self.slots if s.refs > 0),
                    "bytes_per_slot": slot_bytes,
                    "device_bytes": slot_bytes * len(self.slots),
                    "resident": [
                        {"slot": i, "name": s.key[0], "version": s.key[1], "refs": s.refs}
                        for i, s in enumerate(self.slots)
                        if s.key is not None
                    ],
                },
                "cpu": {
                    "capacity": self.cpu_capacity,
                    "entries": [f"{n}@v{v}" for n, v in self.cpu],
                    "bytes": sum(w.nbytes for w in self.cpu.values()),
                    "pinned": self.pin_memory,
                },
                "disk": {
                    "entries": [f"{n}@v{v}" for n, v in self.disk],
                    "bytes": sum(p.stat().st_size for f in self.disk.values() for p in f.iterdir() if p.is_file()),
                },
            }

    def resident(self, name: str) -> bool:
        with self._lock:
            version = self.active.get(name)
            return version is not None and self._slot_of((name, version)) is not None


def device_pinnable(device: torch.device) -> bool:
    return device.type == "cuda"
