"""`latentmas serve`: help, and one-line errors with a non-zero exit for bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serving


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from latentmas.cli import main; main()", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_serve_help_and_config_errors(tmp_path: Path) -> None:
    shown = _serve("--help")
    assert shown.returncode == 0 and "--config" in shown.stdout
    assert "follows registry.json for new versions" in " ".join(shown.stdout.split())
    missing = _serve("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().splitlines()[-1]
        == f"latentmas serve: error: --config {tmp_path / 'nope.yaml'}: no such file"
    )
    partial = tmp_path / "serve.yaml"
    partial.write_text("stack: demo\n")
    wrong = _serve("--config", str(partial))
    assert wrong.returncode == 1 and "expected a mapping with 'stack' and 'spec'" in wrong.stderr
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("stack: demo\nspec: {experts: []}\n")
    refused = _serve("--config", str(invalid))
    assert refused.returncode == 1 and "latentmas serve: error:" in refused.stderr and "experts" in refused.stderr
