"""A bounded Schemathesis run against the served OpenAPI document (inference and reasoning routes, as the
demo server mounts them): every check on, fixed seed, capped examples per operation; it must find
nothing — no 5xx, no undeclared status or content type, no schema-valid request refused, no invalid
one accepted. Generation is kept short by the server's own caps (maxTokens 4)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from latentmas.services.settings import DEFAULT_ROUTERS

from tests.serving.conftest import Stack

pytestmark = pytest.mark.serving
SEED = 20261130
EXAMPLES = 8
# 413 (body limit, prompt tokens beyond maxPromptTokens) is a refusal JSON Schema cannot express; every
# other status keeps Schemathesis' defaults.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "5xx"]
"""


def test_schemathesis_finds_nothing(routed: Stack, serve, tmp_path: Path) -> None:
    running = serve(routed, routers=DEFAULT_ROUTERS, maxTokens=4, maxPromptTokens=512, maxConcurrentRequests=64)
    with running.client() as client:
        assert client.post("/reasoning/chat", json={"prompt": "warm up"}).status_code == 200  # loads the embedder
        evolve = client.post("/reasoning/evolve")  # left out of the run: outside a cluster it is a documented 503
        assert evolve.status_code == 503 and "not running in a Kubernetes cluster" in evolve.json()["error"]["message"]
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is not installed (pip install -e .[dev])"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        st,
        f"--config-file={config}",
        "run",
        f"{running.url}/openapi.json",
        "--checks=all",
        f"--seed={SEED}",
        f"--max-examples={EXAMPLES}",
        "--phases=examples,coverage,fuzzing",
        "--workers=1",
        "--generation-database=none",
        "--request-timeout=60",
        "--max-response-time=60",
        "--exclude-path=/reasoning/evolve",
        "--suppress-health-check=too_slow,data_too_large,filter_too_much",
        "--no-color",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = "\n".join(line[:400] for line in done.stdout.splitlines())  # repro bodies can be megabytes
    assert done.returncode == 0, report[-12000:] + done.stderr[-2000:]
    assert "No issues found" in done.stdout or " passed" in done.stdout, done.stdout[-3000:]
