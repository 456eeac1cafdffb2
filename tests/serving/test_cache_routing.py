"""Adapter residency (slots, LRU, reference counts, memory accounting) and the routing decision."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from latentmas.services.adapter_cache import AdapterCache, NoFreeSlot, UnknownAdapter
from latentmas.services.lora import install_multi_lora
from latentmas.services.routing import decide
from latentmas.training.architectures import discover_target_modules
from transformers import AutoModelForCausalLM

from tests.serving.conftest import Toy

pytestmark = pytest.mark.serving


def test_slots_lru_refcounts_and_accounting(toy: Toy) -> None:
    model = AutoModelForCausalLM.from_pretrained(toy.base)
    served = install_multi_lora(model, discover_target_modules(model), slots=2, max_rank=8)
    fetched: list[str] = []

    def fetch(name: str, version: int) -> Path:
        fetched.append(f"{name}@{version}")
        return toy.adapters[name]

    cache = AdapterCache(served, threading.RLock(), fetch, cpu_capacity=2)
    for name in ("seed1", "seed2", "seed3"):
        cache.activate(name, 1)
    # three adapters, two slots: seed3's activation evicted the least recently used (seed1)
    stats = cache.stats()
    assert sorted(r["name"] for r in stats["slots"]["resident"]) == ["seed2", "seed3"]
    assert stats["cpu"]["entries"] == ["seed2@v1", "seed3@v1"]  # CPU tier LRU holds 2
    assert len(stats["disk"]["entries"]) == 3 and stats["disk"]["bytes"] > 0
    assert stats["slots"]["device_bytes"] == 3 * stats["slots"]["bytes_per_slot"] > 0  # + the zero padding slot
    held = cache.acquire([("seed1", 1.0)])  # reloaded from the disk tier into seed2's (LRU) slot
    other = cache.acquire([("seed3", 0.5), ("seed1", 0.5)])
    assert held.mix[0][0] == other.mix[1][0]  # same resident copy, refcount 2
    with pytest.raises(NoFreeSlot):
        cache.acquire([("seed2", 1.0)])  # both slots busy: nothing may be overwritten
    cache.release(held)
    cache.release(other)
    assert cache.acquire([("seed2", 1.0)]).experts == [("seed2", 1, 1.0)]
    with pytest.raises(UnknownAdapter):
        cache.acquire([("nope", 1.0)])
    assert fetched == ["seed1@1", "seed2@1", "seed3@1"]  # downloads happen once per version


def test_routing_decision() -> None:
    gates = {"finance": 0.6, "legal": 0.3, "code": 0.1}
    served = {"finance", "legal", "code"}
    top1 = decide(gates, "top1", 0.3, served)
    assert top1.experts == [("finance", 1.0)] and top1.confidence == pytest.approx(0.6)
    top2 = decide(gates, "top2", 0.3, served)
    assert [n for n, _ in top2.experts] == ["finance", "legal"]
    assert sum(w for _, w in top2.experts) == pytest.approx(1.0)
    assert top2.experts[0][1] == pytest.approx(2 / 3)
    soft = decide(gates, "soft", 0.3, served)
    assert dict(soft.experts) == pytest.approx(gates)
    low = decide(gates, "top1", 0.7, served)
    assert low.experts == [] and low.reason == "low_confidence"
    # an expert the router knows but this server does not serve is dropped and the rest renormalized
    partial = decide(gates, "top1", 0.3, {"legal", "code"})
    assert partial.experts == [("legal", 1.0)] and partial.confidence == pytest.approx(0.75)
    assert decide(gates, "soft", 0.3, set()).reason == "no_router"
