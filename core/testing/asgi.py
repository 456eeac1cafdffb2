"""Serving an ASGI app (the inference server, the reasoning UI) under uvicorn inside a test process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from latentmas.testing.procs import eventually, free_port


def answers_ready(url: str) -> bool:
    """Whether the server at `url` answers 200 on `/ready` (a refused connection is "not yet")."""
    try:
        return httpx.get(f"{url}/ready", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def served_app(
    app: Any, ready: Callable[[str], bool] = answers_ready, timeout: float = 180, what: str = "the server ready"
) -> Iterator[str]:
    """Runs `app` on a fresh loopback port in a daemon thread and yields its base URL (`http://127.0.0.1:PORT`)
    once `ready(url)` holds; on exit asks uvicorn to stop and waits up to 30 s for the thread.

    Raises AssertionError (from `eventually`) when `ready` does not hold within `timeout` seconds."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: server.started and ready(url), timeout, what)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
