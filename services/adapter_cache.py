"""Adapter residency: N device slots (the MultiLoraModel's stacks), an LRU pinned-CPU tier and a disk
tier, with reference counts so a slot is never rewritten while a request still decodes with it.

Versions are part of the key (`name`, `version`), so publishing v2 of an expert never serves stale v1
weights under the new name, and v1's slot is freed as soon as its last request ends."""

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
        weights = load_peft_adapter(folder, self.lora.shapes)
        if weights.rank > self.lora.max_rank:
            raise ValueError(f"adapter {name} v{version}: rank {weights.rank} > served max rank {self.lora.max_rank}")
        if self.pin_memory:
            weights.modules = {m: (a.pin_memory(), b.pin_memory()) for m, (a, b) in weights.modules.items()}
        with self._lock:
            self.disk[key] = folder
            self.cpu[key] = weights
            self.cpu.move_to_end(key)
            while len(self.cpu) > self.cpu_capacity:
                self.cpu.popitem(last=False)
                self._event("cpu_evict")
        return weights

    def _slot_of(self, key: AdapterKey) -> int | None:
        return next((i for i, s in enumerate(self.slots) if s.key == key), None)

    def _place(self, key: AdapterKey) -> int:
        """Slot holding `key`, loading it into a free or least-recently-used idle slot. Caller holds _lock."""
        found = self._slot_of(key)
        if found is not None:
            self._event("hit")
            return found
        self._event("miss")
        idle = [i for i, s in enumerate(self.slots) if s.refs == 0]
        if not idle:
            raise NoFreeSlot(f"all {len(self.slots)} adapter slots are busy")
        empty = [i for i in idle if self.slots[i].key is None]
        index = empty[0] if empty else min(idle, key=lambda i: self.slots[i].last_used)
        if self.slots[index].key is not None:
            self._event("evict")
        weights = self.cpu.get(key)
        if weights is None:
            weights = load_peft_adapter(self.disk[key], self.lora.shapes)
            self.cpu[key] = weights
        with self.step_lock:
            self.lora.write_slot(index, weights)
        self.slots[index] = Slot(key=key, refs=0, last_used=time.monotonic())
        self._event("load")
        return index

    def activate(self, name: str, version: int) -> None:
        """Stages, prefetches into a slot when one is idle, then switches new requests to `version`."""
        self.stage(name, version)
        with self._lock:
            with contextlib.suppress(NoFreeSlot):  # all slots busy: loaded on first use instead
                self._place((name, version))
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
        index = self._slot_of(key)
        if index is not None and self.slots[index].refs == 0 and self.active.get(key[0]) != key[1]:
            with self.step_lock:
                self.lora.write_slot(index, None)
            self.slots[index] = Slot()
            self._event("unload")

    def acquire(self, weighted: list[tuple[str, float]]) -> Lease:
        """Pins the active version of each named adapter in a slot for one request."""
        with self._lock:
            for name, _ in weighted:
                if name not in self.active:
                    raise UnknownAdapter(name)
            experts, mix = [], []
            placed: list[int] = []
            try:
                for name, weight in weighted:
                    version = self.active[name]
                    index = self._place((name, version))
                    self.slots[index].refs += 1
                    self.slots[index].last_used = time.monotonic()
                    placed.append(index)
                    experts.append((name, version, weight))
                    mix.append((index, weight))
            except Exception:
                for index in placed:
                    self.slots[index].refs -= 1
                raise
            return Lease(experts, mix)

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
                    "device_bytes": slot_bytes * (len(self.slots) + 1),  # + the always-zero padding slot
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
