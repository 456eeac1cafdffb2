"""Hot reload from the registry in the real MinIO while the real server is under load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from latentmas.registry import ArtifactVersion, load_registry, save_registry, version_prefix
from latentmas.store import sha256_file

from tests.serving.conftest import NAMESPACE, Stack, Toy

pytestmark = pytest.mark.serving
BODY = {"prompt": "what is the bond yield", "max_tokens": 6, "lora_adapter": "finance"}


def _wait(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


def test_publish_v2_under_concurrent_load_switches_without_failures(stack: Stack, toy: Toy, serve) -> None:
    stack.publish("experts", "finance", toy.adapters["seed1"])
    running = serve(stack)
    with running.client() as client:
        v1_text = client.post("/generate", json=BODY).json()["response"]

    async def load(stop: asyncio.Event) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:

            async def worker() -> list[httpx.Response]:
                seen = []
                while not stop.is_set():
                    seen.append(await client.post("/generate", json=BODY))
                return seen

            tasks = [asyncio.create_task(worker()) for _ in range(4)]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(stack.publish, "experts", "finance", toy.adapters["seed3"])
            adapters: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while adapters.get("active", {}).get("finance") != 2 and time.monotonic() < deadline:
                adapters = (await client.get("/adapters")).json()
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            stop.set()
            return [r for batch in await asyncio.gather(*tasks) for r in batch]

    responses = asyncio.run(load(asyncio.Event()))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    with running.client() as client:
        listing = client.get("/adapters").json()
        v2_text = client.post("/generate", json=BODY).json()["response"]
    assert listing["active"] == {"finance": 2} and listing["errors"] == {}
    assert v1_text != v2_text  # the versions really answer differently
    versions = [r.json()["lora"]["version"] for r in responses]
    assert {1, 2} <= set(versions), versions
    for response in responses:  # each answer is exactly what its reported version produces (greedy)
        body = response.json()
        assert body["response"] == (v1_text if body["lora"]["version"] == 1 else v2_text)
    resident = [(r["name"], r["version"]) for r in listing["cache"]["slots"]["resident"]]
    assert resident == [("finance", 2)]  # v1's slot was freed once its last request ended


def _publish_corrupt(stack: Stack, toy: Toy, payload: bytes, keep_digest: bool) -> int:
    """Uploads a finance version whose weights file is `payload`; the registry records the real file's
    sha256 (a corrupt transfer) or the payload's own (a broken file uploaded intact)."""
    registry = load_registry(stack.store, stack.bucket, NAMESPACE, stack.name)
    entry = registry.experts["finance"]
    version = entry.next_version()
    prefix = version_prefix(NAMESPACE, stack.name, "experts", "finance", version)
    files = {}
    for path in sorted(toy.adapters["seed3"].iterdir()):
        stack.store.put_file(stack.bucket, prefix + path.name, path)
        files[path.name] = sha256_file(path)
    stack.store.put_bytes(stack.bucket, prefix + "adapter_model.safetensors", payload)
    if not keep_digest:
        import hashlib

        files["adapter_model.safetensors"] = hashlib.sha256(payload).hexdigest()
    entry.history.append(ArtifactVersion(version=version, prefix=prefix, files=files))
    entry.current = version
    save_registry(stack.store, stack.bucket, NAMESPACE, stack.name, registry)
    return version


def test_corrupt_uploads_are_rejected_and_v1_keeps_serving(stack: Stack, toy: Toy, serve) -> None:
    stack.publish("experts", "finance", toy.adapters["seed1"])
    running = serve(stack)
    with running.client() as client:
        v1_text = client.post("/generate", json=BODY).json()["response"]
        bad_digest = _publish_corrupt(stack, toy, b"\x00" * 64, keep_digest=True)
        _wait(lambda: client.get("/adapters").json()["errors"].get("finance", {}).get("version") == bad_digest)
        error = client.get("/adapters").json()["errors"]["finance"]["error"]
        assert "sha256" in error
        answer = client.post("/generate", json=BODY).json()
        assert answer["lora"]["version"] == 1 and answer["response"] == v1_text
        broken_file = _publish_corrupt(stack, toy, b"\x00" * 64, keep_digest=False)
        _wait(lambda: client.get("/adapters").json()["errors"].get("finance", {}).get("version") == broken_file)
        assert "unreadable" in client.get("/adapters").json()["errors"]["finance"]["error"]
        forced = client.post("/adapters/reload").json()
        assert "finance" in forced["errors"]  # a forced check retries and still refuses
        assert client.get("/adapters").json()["active"] == {"finance": 1}
        assert client.post("/generate", json=BODY).json()["response"] == v1_text
        fixed = stack.publish("experts", "finance", toy.adapters["seed3"])
        _wait(lambda: client.get("/adapters").json()["active"] == {"finance": fixed})
        assert client.get("/adapters").json()["errors"] == {}
        metrics = client.get("/metrics").text
    assert "inference_adapter_reload_failures_total 3.0" in metrics


def test_unload_pin_and_rollback_through_the_api(stack: Stack, toy: Toy, serve) -> None:
    stack.publish("experts", "finance", toy.adapters["seed1"])
    stack.publish("experts", "finance", toy.adapters["seed3"])
    running = serve(stack)
    with running.client() as client:
        assert client.get("/adapters").json()["active"] == {"finance": 2}
        v2_text = client.post("/generate", json=BODY).json()["response"]
        assert client.delete("/adapters/finance").json()["active"] == {}
        gone = client.post("/generate", json=BODY)
        assert gone.status_code == 404
        assert client.post("/adapters/finance", json={"version": 1}).json()["active"] == {"finance": 1}
        rolled_back = client.post("/generate", json=BODY).json()
        assert rolled_back["lora"]["version"] == 1 and rolled_back["response"] != v2_text
        assert client.post("/adapters/finance", json={"version": 9}).status_code == 404
        assert client.post("/adapters/finance").json()["active"] == {"finance": 2}  # back to the registry's
