"""Router features of `auto` requests: one truncated forward (up to the feature layer, no LM head) batched
across the requests waiting for the model, equal to computing each request's features alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from latentmas.services.routing import RouteDecision, RouterRuntime
from latentmas.services.server import GenerationRequest
from latentmas.testing.procs import eventually
from latentmas.training.router_model import RouterConfig, RouterMLP, save_router
from latentmas.training.router_tfidf import fit_tfidf_router, save_tfidf_router
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serving.conftest import Stack, Toy
from tests.serving.test_cache_routing import _finishes

pytestmark = pytest.mark.serving
QUESTIONS = [
    "bond",
    "what is the market price of the bond today and who sets it",
    "which court hears the appeal",
    "the price",
]


@contextmanager
def calls(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, list[int]]]:
    """Records the batch size of every forward call of each named (real) module."""
    seen: dict[str, list[int]] = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(lambda _m, inputs, _o, name=name: seen[name].append(inputs[0].shape[0]))
        for name, module in modules.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _watched(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The feature block (hidden_states[1] is block 0's output), the block after it, and the LM head."""
    layers = model.get_decoder().layers
    return {"feature_block": layers[0], "next_block": layers[1], "lm_head": model.get_output_embeddings()}


def _mlp_router(folder: Path, hidden: int) -> Path:
    """A random router reading hidden_states[1], its input layer scaled up so that the gates follow the small
    differences between the random base's features of different questions."""
    torch.manual_seed(7)
    router = RouterMLP(hidden, 16, 3)
    with torch.no_grad():
        router.net[0].weight.mul_(3000.0)
        router.net[0].bias.zero_()
    save_router(folder, router, RouterConfig(["a", "b", "c"], 1, 1.0, 16, hidden))
    return folder


def test_batched_gates_equal_one_at_a_time_and_never_run_the_lm_head(toy: Toy, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(toy.base).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    tokenizer.padding_side = "left"  # the router's encoding right-pads whatever the tokenizer says
    runtime = RouterRuntime(_mlp_router(tmp_path / "router", model.config.hidden_size), 1, torch.device("cpu"))
    assert runtime.reads_model
    asks = [(q, 0.5) for q in QUESTIONS] + [(QUESTIONS[1], 2.0)]
    with torch.inference_mode(), calls(_watched(model)) as seen:
        batched = runtime.gates_many(model, tokenizer, asks)
    # one truncated forward per distinct temperature, the questions of different lengths in one batch
    assert seen == {"feature_block": [len(QUESTIONS), 1], "next_block": [], "lm_head": []}
    with torch.inference_mode():
        alone = [runtime.gates(model, tokenizer, q, t) for q, t in asks]
    for got, want in zip(batched, alone, strict=True):
        assert got.keys() == want.keys() and got == pytest.approx(want, abs=1e-5)
    assert len({tuple(round(w, 3) for w in g.values()) for g in batched}) == len(asks), "gates follow the text"
    assert batched[1] != pytest.approx(batched[-1], abs=1e-3)  # the temperature is applied per request


def test_waiting_auto_requests_share_one_truncated_forward(routed: Stack, serve, tmp_path: Path) -> None:
    """While a decode step holds the model, `auto` requests queue their questions; the first to get the model
    computes all of them in one forward that stops at the router's feature layer. A TF-IDF router reads the
    text alone and routes while the model is busy."""
    running = serve(routed, confidenceThreshold=0.6, routingMode="top1")
    server, threads = running.server, len(QUESTIONS)
    runtime, engine = server.runtime, server.engine
    assert runtime is not None and engine is not None
    decisions: dict[int, object] = {}

    def route(index: int) -> None:
        decisions[index] = server.route(GenerationRequest(prompt=QUESTIONS[index]))

    with calls(_watched(server.model)) as seen:
        with engine.step_lock:  # a decode step in progress
            workers = [threading.Thread(target=route, args=(i,), daemon=True) for i in range(threads)]
            for worker in workers:
                worker.start()
            eventually(lambda: runtime.gates.waiting == threads, 120, "every auto request queued its question")
        for worker in workers:
            worker.join(120)
        assert seen == {"feature_block": [threads], "next_block": [], "lm_head": []}
        alone = {i: server.route(GenerationRequest(prompt=QUESTIONS[i])) for i in range(threads)}
    assert decisions == alone and all(d.experts == [("legal", 1.0)] for d in alone.values())

    texts = ["bond price", "market yield", "court appeal", "judge ruling"]
    save_tfidf_router(tmp_path / "tfidf", fit_tfidf_router(texts, [0, 0, 1, 1], ["finance", "legal"], 0.1, seed=0))
    routed.publish("router", "router", tmp_path / "tfidf")
    eventually(lambda: server.router is not None and server.router.kind == "tfidf-lr", 120, "tf-idf router loaded")
    with engine.step_lock:
        decision = _finishes(lambda: server.route(GenerationRequest(prompt="the court appeal")))
    assert isinstance(decision, RouteDecision) and decision.experts == [("legal", 1.0)]
