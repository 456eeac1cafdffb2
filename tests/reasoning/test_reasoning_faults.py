"""Reasoning endpoints under field faults: characters split across tokens stream whole (the relay uses the
service's one detokeniser), numeric edge values are handled or refused naming the field, and refusals
are the serving app's JSON error body, before any stream starts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from latentmas.services.detokenize import REPLACEMENT
from latentmas.services.reasoning_api import ReasoningSettings, _TokenRelay
from latentmas.services.sessions import SessionStore
from latentmas.services.text_pipeline import Sampling, pick_tokens

from tests.reasoning.helpers import build_app, service_for
from tests.serving.bytetok import SPLIT_TEXTS, byte_fallback, byte_level

pytestmark = pytest.mark.reasoning


@pytest.mark.parametrize("make", [byte_level, byte_fallback])
def test_the_relay_streams_whole_characters_and_keeps_going(make) -> None:
    tokenizer = make()

    async def relay(ids: list[int]) -> list[str]:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        sink = _TokenRelay(tokenizer, asyncio.get_running_loop(), queue)

        def feed() -> None:  # from a worker thread, as the pipelines call it
            for token in ids:
                sink(0, token)
            sink(1, ids[0])  # other rows are not relayed

        await asyncio.to_thread(feed)
        await asyncio.sleep(0)
        deltas = []
        while not queue.empty():
            item = queue.get_nowait()
            assert item is not None
            deltas.append(item)
        return deltas

    for text in SPLIT_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        deltas = asyncio.run(relay(ids))
        assert "".join(deltas) == text  # the old relay stopped after the first split character
        assert all(REPLACEMENT not in delta for delta in deltas)


def test_tiny_and_subnormal_temperatures_sample_like_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 4.99, 1.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1e-40, 5e-324, 1e-300):
        chosen = pick_tokens(logits, Sampling(temperature=temperature), generator)
        assert chosen.tolist() == [1, 0]


def test_chat_numeric_edges_and_caps(tmp_path, backend) -> None:
    settings = ReasoningSettings(max_tokens=8, max_prompt_chars=200)
    client = TestClient(build_app(service_for(backend, SessionStore(tmp_path / "s.db"), settings=settings)))
    ask = {"prompt": "Plan a bond ladder.", "max_tokens": 4}
    refused: dict[str, list[Any]] = {
        "temperature": [-5e-324, 2.0000001, "0.5", True],
        "top_p": [0.0, 1.5],
        "max_tokens": [0, 9, 10**30, 2.5, "4"],  # 9: above the server cap of 8
        "latent_steps": [-1, 513, 1.5],
        "use_cache": [0, "yes"],
        "prompt": ["x" * 201],
    }
    for path in ("/reasoning/chat", "/reasoning/chat/stream"):
        for field, values in refused.items():
            for value in values:
                response = client.post(path, json={**ask, field: value})
                assert response.status_code == 400, (path, field, value, response.text)
                assert response.json()["error"]["param"] == field, (field, value, response.json())
        for raw in (b"NaN", b"Infinity"):
            body = b'{"prompt": "hi", "max_tokens": 2, "temperature": ' + raw + b"}"
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
    for fields in ({"temperature": 5e-324}, {"temperature": 1e-40, "top_p": 5e-324}, {"max_tokens": 8.0}, {}):
        response = client.post("/reasoning/chat", json={**ask, **fields})
        assert response.status_code == 200, (fields, response.text)
        assert response.json()["response"] is not None
