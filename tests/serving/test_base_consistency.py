"""Serving never pairs the base with an adapter recorded as trained on another base: the version is refused
with both identities in /adapters, while matching versions (current and previous identity forms) load."""

from __future__ import annotations

import pytest
from latentmas.registry import load_registry
from latentmas.store import sha256_file
from latentmas.testing.procs import eventually
from latentmas.training.baseimport import base_identity

from tests.serving.conftest import NAMESPACE, Stack, Toy

pytestmark = pytest.mark.serving


def test_adapter_of_another_base_is_refused_and_matching_ones_load(stack: Stack, toy: Toy, serve) -> None:
    base = load_registry(stack.store, stack.bucket, NAMESPACE, stack.name).base.active()
    assert base is not None
    identity = base_identity(base.files)
    foreign = {"base_sha256": "f" * 64, "base": {"identity": "f" * 64, "model_type": "qwen2", "hidden_size": 896}}
    stack.publish("experts", "foreign", toy.adapters["seed1"], foreign)
    stack.publish("experts", "current", toy.adapters["seed2"], {"base_sha256": identity})
    legacy = sha256_file(toy.base / "model.safetensors")
    stack.publish("experts", "legacy", toy.adapters["seed3"], {"base_sha256": legacy})
    running = serve(stack)
    with running.client() as client:

        def loaded() -> dict | None:
            body = client.get("/adapters").json()
            done = {"current", "legacy"} <= body["active"].keys() and "foreign" in body["errors"]
            return body if done else None

        adapters = eventually(loaded, 120, "adapters loaded and the foreign one refused")
        assert {"current": 1, "legacy": 1}.items() <= adapters["active"].items()
        assert "foreign" not in adapters["active"]
        error = adapters["errors"]["foreign"]["error"]
        assert "trained on base [qwen2 hidden=896 id=ffffffffffffffff]" in error
        assert f"served base is [llama hidden=64 id={identity[:16]}]" in error
        refused = client.post(
            "/v1/chat/completions", json={"model": "foreign", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert refused.status_code == 404
        served = client.post(
            "/v1/chat/completions",
            json={"model": "current", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert served.status_code == 200, served.text
