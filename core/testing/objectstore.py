"""A real MinIO server for tests and for `latentmas demo` when the binary is available."""

from __future__ import annotations

import secrets
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from latentmas.testing.binaries import binary
from latentmas.testing.procs import ServerProcess, free_port


def _ready(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return int(response.status) == 200


@dataclass
class MinioServer:
    """One MinIO server on a free loopback port with generated root credentials."""

    workdir: Path
    access_key: str = "latentmas-test"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    endpoint: str = ""
    process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self, minio_binary: str | None = None) -> MinioServer:
        port = free_port()
        self.endpoint = f"127.0.0.1:{port}"
        self.process = ServerProcess(
            "minio",
            [
                minio_binary or binary("minio"),
                "server",
                str(self.workdir / "data"),
                "--address",
                self.endpoint,
                "--console-address",
                f"127.0.0.1:{free_port()}",
                "--quiet",
            ],
            self.workdir / "logs",
            env={
                "MINIO_ROOT_USER": self.access_key,
                "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
            },
        )
        self.process.wait_until(lambda: _ready(f"{self.url}/minio/health/ready"), 60, "ready MinIO")
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()
