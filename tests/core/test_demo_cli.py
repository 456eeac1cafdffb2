"""`latentmas demo` and a port someone else holds: refused before the cycle, and never mistaken for its own
server (a second demo used to print the first one's answer as its own and exit 0)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from latentmas.cli import main
from latentmas.democli import _wait_ready, port_in_use

pytestmark = pytest.mark.harness


class _AlwaysReady(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"ready": true}')

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def other_server() -> Iterator[int]:
    """Another process's ready server, on a port of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AlwaysReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_demo_refuses_a_busy_port_before_its_cycle(
    other_server: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--preset", "tiny", "--workdir", str(workdir), "--port", str(other_server)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"latentmas demo: error: --port {other_server}: the port is in use (another demo?); "
        "pick another or use --no-serve"
    ]
    assert not workdir.exists(), "nothing is written for a refused demo"


def test_another_servers_ready_answer_is_not_ours(other_server: int) -> None:
    ours = threading.Thread(target=lambda: None)  # our server's thread, ended (its port was taken)
    ours.start()
    ours.join()
    with pytest.raises(RuntimeError, match="stopped before it was ready"):
        _wait_ready(f"http://127.0.0.1:{other_server}", 30, ours)


def test_a_free_port_is_not_reported_in_use() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert not port_in_use(port)
