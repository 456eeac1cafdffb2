"""The reasoning router as the serving app mounts it by default: the real InferenceServer (multi-LoRA
engine, registry, hot reload) behind `ServerBackend`, with the latent pipeline running on the engine's
model under its step lock and an expert selected through the engine's adapter slots."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from fastapi.testclient import TestClient
from latentmas.services.app import create_app
from latentmas.services.latent_pipeline import LatentConfig, run_pipeline
from latentmas.services.reasoning_api import ModelAccess, ServerBackend
from latentmas.services.settings import ServeSettings
from latentmas.services.text_pipeline import Sampling
from latentmas.services.toymodel import build_adapter, build_base, publish
from latentmas.spec import StorageSpec
from latentmas.store import LocalStore

pytestmark = pytest.mark.reasoning


def test_default_router_serves_the_latent_pipeline_on_the_inference_server(tmp_path):
    store = LocalStore(tmp_path / "s3")
    store.ensure_bucket("artifacts")
    base = build_base(tmp_path / "base")
    publish(store, "artifacts", "default", "demo", "base", "base", base)
    publish(store, "artifacts", "default", "demo", "experts", "finance", build_adapter(base, tmp_path / "a1", seed=1))
    settings = ServeSettings(
        namespace="default",
        stack="demo",
        storage=StorageSpec(endpoint=f"file://{tmp_path / 's3'}"),
        cache_dir=tmp_path / "cache",
        device="cpu",
        notifications=False,
    )
    app = create_app(settings, store)
    with TestClient(app) as client:
        deadline = time.monotonic() + 180  # the model's load on a loaded machine
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.2)
        assert "LatentMAS Stack" in client.get("/").text
        ask = {"prompt": "what is the risk of a bond ?", "max_tokens": 4, "latent_steps": 2}
        latent = client.post("/reasoning/chat", json={**ask, "pipeline": "latent", "lora_adapter": "finance"})
        assert latent.status_code == 200, latent.text
        body = latent.json()
        assert body["agents"] == ["Planner", "Critic", "Refiner", "Judger"] and body["latent_steps"] == 6
        assert body["adapter"] == "finance" and body["domain_confidence"] == 1.0
        server = app.state.engine
        assert server.cache.stats()["slots"]["busy"] == 0  # the pipeline's adapter lease was released
        single = client.post("/reasoning/chat", json={**ask, "pipeline": "single"}).json()
        assert single["agents"] == ["Assistant"] and single["adapter"] is None
        experts = client.get("/reasoning/experts").json()
        assert experts["experts"] == [{"name": "finance", "active": 1, "target": 1}]
        assert client.post("/reasoning/evolve").status_code == 503
        metrics = client.get("/metrics").text
        assert "latentmas_semantic_cache_misses_total 2.0" in metrics  # two stateless requests so far

        # The expert really takes part in the pipeline's forward passes (through the engine's LoRA slots).
        backend = ServerBackend(server)

        def first_logits(adapter: str | None) -> torch.Tensor:
            def work(access: ModelAccess) -> torch.Tensor:
                result = run_pipeline(
                    "latent",
                    access.model,
                    access.tokenizer,
                    ["bond risk ?"],
                    Sampling(max_new_tokens=1),
                    latent=LatentConfig(2),
                    adapter=adapter,
                    adapter_scope=access.adapter_scope,
                )
                assert result.first_logits is not None
                return result.first_logits

            return asyncio.run(backend.run_exclusive(work, [adapter] if adapter else []))

        with_expert, without = first_logits("finance"), first_logits(None)
        assert (with_expert - without).abs().max().item() > 1e-4
        assert torch.equal(first_logits("finance"), with_expert)
