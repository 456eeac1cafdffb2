"""Adapter residency (slots, LRU, reference counts, memory accounting) and the routing decision."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from latentmas.services.adapter_cache import AdapterCache, Lease, NoFreeSlot, UnknownAdapter
from latentmas.services.lora import install_multi_lora
from latentmas.services.routing import decide
from latentmas.testing.procs import eventually
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
    assert stats["slots"]["device_bytes"] == 2 * stats["slots"]["bytes_per_slot"] > 0
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


def _finishes(fn: Callable[[], object], seconds: float = 60) -> object:
    """Runs `fn` in a thread and returns its result; fails if it blocks (the caller holds the model lock)."""
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{fn} blocked"
    return result[0]


def test_a_request_holding_v1_finishes_on_v1_while_v2_waits_for_the_model(toy: Toy, tmp_path: Path) -> None:
    """v2 of finance is loaded while a long step holds the model lock: the loader waits for the model, but
    leases, releases, stats and requests for resident adapters go on (the cache lock is never held while
    waiting), new requests keep getting v1 until v2 is written, and a request holding v1 decodes exactly
    v1's own greedy answer through the engine while v2 loads beside it."""
    from latentmas.services.engine import Engine, Sequence
    from latentmas.services.sampling import SamplingParams
    from transformers import AutoTokenizer

    from tests.serving.test_engine import _reference

    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    served = install_multi_lora(model, discover_target_modules(model), slots=3, max_rank=8)
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    engine = Engine(served, tokenizer, max_batch_size=4)
    engine.eos_ids = []
    sources = {("finance", 1): "seed1", ("finance", 2): "seed3", ("legal", 1): "seed2"}
    # the cache deletes a superseded version's folder: it gets downloaded copies, as from the registry
    folders = {key: Path(shutil.copytree(toy.adapters[seed], tmp_path / seed)) for key, seed in sources.items()}
    cache = AdapterCache(served, engine.step_lock, lambda name, version: folders[(name, version)])
    cache.activate("finance", 1)
    cache.activate("legal", 1)
    held = cache.acquire([("finance", 1.0)])
    v1_slot = held.mix[0][0]

    step_running, step_done = threading.Event(), threading.Event()

    def long_step() -> None:
        with engine.step_lock:
            step_running.set()
            step_done.wait(300)  # released by the test; a timeout here would end the "step" under its checks

    threading.Thread(target=long_step, daemon=True).start()
    assert step_running.wait(60)
    loader = threading.Thread(target=cache.activate, args=("finance", 2), daemon=True)
    loader.start()
    eventually(lambda: ("finance", 2) in [s.key for s in cache.slots if s.loading is not None], 120, "v2 claimed")
    legal = _finishes(lambda: cache.acquire([("legal", 1.0)]))
    again = _finishes(lambda: cache.acquire([("finance", 1.0)]))
    assert isinstance(legal, Lease) and isinstance(again, Lease)
    assert again.experts == [("finance", 1, 1.0)]  # v2 is not served before its weights are written
    _finishes(lambda: cache.release(legal))
    _finishes(lambda: cache.release(again))
    _finishes(cache.stats)
    assert loader.is_alive()  # still waiting for the model, holding nothing the others need

    prompt = "what is the market price of the bond"
    finished = threading.Event()
    seq = Sequence(
        tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=8), held.mix, lambda _: None, lambda _: finished.set()
    )
    engine.start()
    try:
        engine.submit(seq)
        step_done.set()
        loader.join(120)
        assert not loader.is_alive() and cache.active["finance"] == 2
        assert finished.wait(120)
    finally:
        engine.stop()
    assert seq.finish_reason == "length" and seq.output_ids == _reference(toy, "seed1", prompt, 8)
    assert cache.slots[v1_slot].key == ("finance", 1)  # held: never rewritten by v2
    cache.release(held)
    assert ("finance", 1) not in [s.key for s in cache.slots]  # freed once its last request ended
    assert cache.acquire([("finance", 1.0)]).experts == [("finance", 2, 1.0)]


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
    # the router's top choice has no version here (not promoted): the base answers, not the nearest expert
    unserved = decide(gates, "top1", 0.3, {"legal", "code"})
    assert unserved.experts == [] and unserved.reason == "unserved_expert"
    assert unserved.confidence == pytest.approx(0.6)
    # a secondary choice without a version is dropped and the served ones renormalized
    partial = decide(gates, "top2", 0.3, {"finance", "code"})
    assert partial.experts == [("finance", 1.0)]
    assert dict(decide(gates, "soft", 0.3, {"finance", "code"}).experts) == pytest.approx(
        {"finance": 6 / 7, "code": 1 / 7}
    )
    assert decide(gates, "soft", 0.3, set()).reason == "no_router"
