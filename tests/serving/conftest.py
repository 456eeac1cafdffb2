"""Serving fixtures: a tiny random Llama with a local tokenizer, random PEFT adapters, a registry in the
real MinIO, and the real HTTP server (uvicorn) on a free port."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from latentmas.services.app import create_app
from latentmas.services.server import InferenceServer
from latentmas.services.settings import ServeSettings
from latentmas.services.toymodel import build_adapter, build_base, publish
from latentmas.spec import InferenceSpec, StorageSpec
from latentmas.store import S3Store
from latentmas.testing.fixtures import MinioFixture

NAMESPACE = "serving"
_stacks = itertools.count()


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny models gain nothing from 2 threads, and on this shared 2-core box OpenMP spinning made the
    main thread's matmuls ~20x slower; restored afterwards for other areas' tests."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Toy:
    base: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Toy:
    root = tmp_path_factory.mktemp("toy")
    base = build_base(root / "base")
    adapters = {f"seed{seed}": build_adapter(base, root / f"adapter-{seed}", seed=seed) for seed in (1, 2, 3, 4)}
    adapters["rank8-attn"] = build_adapter(base, root / "adapter-r8", seed=5, rank=8, targets=["q_proj", "v_proj"])
    return Toy(base, adapters)


@dataclass
class Stack:
    store: S3Store
    bucket: str
    name: str

    def publish(self, kind: str, name: str, folder: Path, metrics: dict[str, object] | None = None) -> int:
        return publish(self.store, self.bucket, NAMESPACE, self.name, kind, name, folder, metrics)[1]


@pytest.fixture
def stack(minio: MinioFixture, toy: Toy) -> Stack:
    """A fresh stack whose registry already holds the base model."""
    created = Stack(minio.store, "artifacts", f"s{next(_stacks)}-{int(time.time())}")
    created.publish("base", "base", toy.base)
    return created


def router_folder(toy: Toy, folder: Path, favourite: int) -> Path:
    """A router over finance/legal whose output bias makes expert `favourite` the clear choice."""
    import torch
    from latentmas.training.router_model import RouterConfig, RouterMLP, save_router
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(toy.base).hidden_size
    config = RouterConfig(experts=["finance", "legal"], feature_layer=1, temperature=1.0, hidden=8, input_dim=hidden)
    router = RouterMLP(hidden, 8, 2)
    with torch.no_grad():
        router.net[2].weight.zero_()
        router.net[2].bias.copy_(torch.tensor([8.0, 0.0] if favourite == 0 else [0.0, 8.0]))
    save_router(folder, router, config)
    return folder


@pytest.fixture
def routed(stack: Stack, toy: Toy, tmp_path: Path) -> Stack:
    """The stack with experts finance and legal and a router that prefers legal."""
    stack.publish("experts", "finance", toy.adapters["seed1"])
    stack.publish("experts", "legal", toy.adapters["seed2"])
    stack.publish("router", "router", router_folder(toy, tmp_path / "router", favourite=1))
    return stack


@dataclass
class Running:
    url: str
    server: InferenceServer
    token: str | None = None

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serve(minio: MinioFixture, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Starts the real app under uvicorn for a stack; every server started is stopped after the test."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(stack: Stack, token: str | None = None, routers: tuple[str, ...] = (), **inference: object) -> Running:
        settings = ServeSettings(
            namespace=NAMESPACE,
            stack=stack.name,
            storage=StorageSpec(endpoint=stack.store.endpoint),
            inference=InferenceSpec.model_validate({"reloadPollSeconds": 0.5, "adapterSlots": 4, **inference}),
            cache_dir=tmp_path / f"cache-{len(started)}",
            device="cpu",
            auth_token=token,
            routers=routers,
            notifications=False,  # this MinIO build never answers the listen API; polling is what runs
        )
        app = create_app(settings, store=stack.store)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        running = Running(f"http://127.0.0.1:{port}", app.state.engine, token)
        deadline = time.monotonic() + 180  # loading the model on a loaded machine
        with running.client() as client:
            while time.monotonic() < deadline:
                try:
                    if client.get("/ready").status_code == 200:
                        return running
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server for {stack.name} not ready: {app.state.engine.startup_error}")

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=30)
