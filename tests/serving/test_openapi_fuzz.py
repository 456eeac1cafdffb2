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


def test_schemathesis_finds_nothing(routed: Stack, serve, tmp_path: Path) -> None:
    running = serve(routed, routers=DEFAULT_ROUTERS, maxTokens=4, maxPromptTokens=512, maxConcurrentRequests=64)
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is not installed (pip install -e .[dev])"
    command = [
        st,
        "run",
        f"{running.url}/openapi.json",
        "--checks=all",
        f"--seed={SEED}",
        f"--max-examples={EXAMPLES}",
        "--phases=examples,coverage,fuzzing",
        "--workers=1",
        "--generation-database=none",
        "--request-timeout=60",
        "--suppress-health-check=too_slow,data_too_large,filter_too_much",
        "--no-color",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-2000:]
