"""The package layout: one `latentmas` namespace and nothing that shadows the stdlib `operator`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.harness
ROOT = Path(__file__).resolve().parents[2]


def test_top_level_operator_folder_is_not_a_regular_package() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_python_dash_m_from_repo_root_keeps_stdlib_operator() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "json.tool", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    probe = "import operator, latentmas.operator.names as n; print(operator.__file__, n.__name__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    stdlib_file, module = out.stdout.split()
    assert "site-packages" not in stdlib_file and not stdlib_file.startswith(str(ROOT))
    assert module == "latentmas.operator.names"


def test_cli_help_is_instant_and_lists_commands() -> None:
    done = subprocess.run([sys.executable, "-m", "latentmas", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "stage" in done.stdout and "cycle" in done.stdout
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, latentmas.cli as c; c.build_parser(); print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert heavy.stdout.strip() == "False", "building the CLI parser imported torch"
