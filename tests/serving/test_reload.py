"""Hot reload from the registry in the real MinIO while the real server is under load."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pytest
from latentmas.names import RESERVED_EXPERT_NAMES
from latentmas.registry import (
    ArtifactVersion,
    load_registry,
    registry_key,
    save_registry,
    update_registry,
    version_prefix,
)
from latentmas.services.hotreload import RegistrySource, Reloader, Watcher
from latentmas.store import S3Store, sha256_file
from latentmas.testing.objectstore import MinioServer
from latentmas.testing.procs import eventually

from tests.serving.conftest import NAMESPACE, Stack, Toy

pytestmark = pytest.mark.serving
BODY = {"prompt": "what is the bond yield", "max_tokens": 6, "lora_adapter": "finance"}


def _wait(check: Callable[[], bool], timeout: float = 120) -> None:
    eventually(check, timeout, "the reload's outcome", interval=0.1)


def test_publish_v2_under_concurrent_load_switches_without_failures(stack: Stack, toy: Toy, serve) -> None:
    stack.publish("experts", "finance", toy.adapters["seed1"])
    running = serve(stack)
    with running.client() as client:
        v1_text = client.post("/generate", json=BODY).json()["response"]

    async def load(stop: asyncio.Event) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            seen: list[httpx.Response] = []

            async def worker() -> None:
                while not stop.is_set():
                    seen.append(await client.post("/generate", json=BODY))

            def answered_by(version: int) -> bool:
                return any(r.status_code == 200 and r.json()["lora"]["version"] == version for r in seen)

            async def until(check: Callable[[], bool], what: str) -> None:
                """Polls `check` while the load runs (two minutes on a loaded machine), not a fixed sleep."""
                deadline = time.monotonic() + 120
                while not check():
                    statuses = sorted({r.status_code for r in seen})
                    assert time.monotonic() < deadline, f"timed out waiting for {what} (statuses {statuses})"
                    await asyncio.sleep(0.1)

            tasks = [asyncio.create_task(worker()) for _ in range(4)]
            await until(partial(answered_by, 1), "an answer by v1 under load")
            await asyncio.to_thread(stack.publish, "experts", "finance", toy.adapters["seed3"])
            deadline = time.monotonic() + 120
            while (await client.get("/adapters")).json()["active"].get("finance") != 2:
                assert time.monotonic() < deadline, "timed out waiting for v2 to become active"
                await asyncio.sleep(0.1)
            # The switch is seen by requests that start after it: wait for one answered by v2, however slow.
            await until(partial(answered_by, 2), "an answer by v2 under load")
            stop.set()
            await asyncio.gather(*tasks)
            return seen

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
    # v1's slot is freed once its last request ended (the release runs off the event loop, after the answer went out).
    with running.client() as client:
        _wait(lambda: _resident(client) == [("finance", 2)])


def _resident(client: httpx.Client) -> list[tuple[str, int]]:
    return [(r["name"], r["version"]) for r in client.get("/adapters").json()["cache"]["slots"]["resident"]]


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


def _refused_reason(client: httpx.Client) -> str | None:
    error = client.get("/adapters").json()["registry_error"]
    return error["reason"] if error else None


def test_registry_reads_that_say_nothing_or_go_back_never_unload(stack: Stack, toy: Toy, serve) -> None:
    stack.publish("experts", "finance", toy.adapters["seed1"])
    stack.publish("experts", "legal", toy.adapters["seed2"])
    good = load_registry(stack.store, stack.bucket, NAMESPACE, stack.name)
    key = registry_key(NAMESPACE, stack.name)
    running = serve(stack)
    older = good.model_copy(update={"revision": good.revision - 1})
    with running.client() as client:
        served = {"finance": 1, "legal": 1}
        assert client.get("/adapters").json()["active"] == served
        writes: list[tuple[str, Callable[[], object]]] = [
            ("empty", lambda: stack.store.put_bytes(stack.bucket, key, b"{}")),
            ("missing", lambda: stack.store.delete(stack.bucket, key)),
            ("unparseable", lambda: stack.store.put_bytes(stack.bucket, key, b'{"experts": ')),
            ("older", lambda: stack.store.put_bytes(stack.bucket, key, older.model_dump_json().encode())),
            ("unparseable", lambda: stack.store.put_bytes(stack.bucket, key, b'{"revision": 99, "experts": [1]}')),
            ("empty", lambda: stack.store.put_bytes(stack.bucket, key, b'{"revision": 99, "experts": {}}')),
        ]
        for reason, write in writes:
            write()
            _wait(partial(lambda wanted: _refused_reason(client) == wanted, reason))
            listing = client.get("/adapters").json()
            assert listing["active"] == served and listing["registry_revision"] == good.revision
            ready = client.get("/ready")
            assert ready.status_code == 200 and ready.json()["registry_error"]["reason"] == reason
            assert client.post("/generate", json=BODY).json()["lora"]["version"] == 1
            forced = client.post("/adapters/reload")
            assert forced.status_code == 409 and forced.json()["error"]["type"] == "conflict_error", forced.text
            assert client.get("/adapters").json()["active"] == served
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"auto", "base", "finance", "legal"}
        metrics = client.get("/metrics").text
        for reason in ("empty", "missing", "unparseable", "older"):
            assert f'inference_registry_refused_reads_total{{reason="{reason}"}}' in metrics, reason
        rollback = good.model_copy(deep=True)  # a deliberate rollback: the old content as a new revision
        del rollback.experts["legal"]
        content = {
            "base": rollback.base,
            "router": rollback.router,
            "index": rollback.index,
            "experts": rollback.experts,
        }
        saved = update_registry(
            stack.store, stack.bucket, NAMESPACE, stack.name, lambda read: read.model_copy(update=content)
        )
        _wait(lambda: client.get("/adapters").json()["active"] == {"finance": 1})
        listing = client.get("/adapters").json()
        assert listing["registry_error"] is None and listing["registry_revision"] == saved.revision == 100
        assert client.get("/ready").json()["registry_error"] is None
        assert client.post("/adapters/reload").status_code == 200
        assert f"inference_registry_revision {saved.revision}.0" in client.get("/metrics").text


def test_reserved_expert_names_are_refused_and_listed_once(stack: Stack, toy: Toy, serve) -> None:
    stack.publish("experts", "finance", toy.adapters["seed1"])
    for name in sorted(RESERVED_EXPERT_NAMES):
        stack.publish("experts", name, toy.adapters["seed2"])
    running = serve(stack)
    with running.client() as client:
        listing = client.get("/adapters").json()
        assert listing["active"] == {"finance": 1}
        for name in RESERVED_EXPERT_NAMES:
            assert f"expert name {name!r} is reserved" in listing["errors"][f"experts/{name}"]["error"]
        assert listing["versions"]["router"] is None and listing["versions"]["base"] == 1
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert models == ["auto", "base", "finance"]
        base = client.post("/generate", json={**BODY, "lora_adapter": "base"}).json()
        assert base["lora"] is None and base["model"] == "base"
        assert client.post("/adapters/reload").json()["errors"].keys() == {
            f"experts/{n}" for n in RESERVED_EXPERT_NAMES
        }


def test_storage_outage_gives_json_errors_backoff_and_bounded_logs(
    toy: Toy, serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    minio = MinioServer(tmp_path / "minio").start()
    store = S3Store(minio.endpoint, minio.access_key, minio.secret_key, secure=False, region="us-east-1")
    store.ensure_bucket("artifacts")
    stack = Stack(store, "artifacts", "outage")
    stack.publish("base", "base", toy.base)
    stack.publish("experts", "finance", toy.adapters["seed1"])
    running = serve(stack, reloadPollSeconds=0.05)
    assert running.server.watcher is not None
    with running.client() as client:
        assert client.post("/generate", json=BODY).status_code == 200
        caplog.set_level(logging.DEBUG, logger="latentmas.services.hotreload")
        minio.stop()
        reload = client.post("/adapters/reload")
        assert reload.status_code == 503 and reload.headers["content-type"] == "application/json"
        assert "registry unreadable, still serving the last good revision" in reload.json()["error"]["message"]
        _wait(lambda: running.server.watcher is not None and running.server.watcher.failures >= 4, timeout=120)
        listing = client.get("/adapters").json()
        assert listing["registry_error"]["reason"] == "storage" and listing["active"] == {"finance": 1}
        assert listing["notifications"] is False
        assert client.post("/generate", json=BODY).json()["lora"]["version"] == 1  # served from memory
        assert client.get("/ready").json()["registry_error"]["reason"] == "storage"
    failures = [r for r in caplog.records if "registry check failed" in r.getMessage()]
    warned = [r for r in failures if r.levelno >= logging.WARNING]
    assert len(failures) >= 4 and len(warned) <= 3  # failures 1, 2, 4 at warning; the rest at debug
    assert all("registry read refused" not in r.getMessage() for r in caplog.records)


def test_notifications_are_reported_only_once_the_listen_call_answers(stack: Stack) -> None:
    """This MinIO build never answers the listen API (see docs/serving.md): the flag must stay false while
    the listen request is pending, which the old code reported as true."""
    source = RegistrySource(stack.store, stack.bucket, NAMESPACE, stack.name, Path("/nonexistent"))
    reloader = Reloader(source, lambda *_: None, lambda _: None, lambda *_: None, dict)
    watcher = Watcher(reloader, 0.2, lambda _: None, listen=True).start()
    try:
        _wait(lambda: watcher.listen_attempts >= 1 and watcher.checks >= 2)
        assert watcher.notifications is False
    finally:
        watcher.stop()
