"""Finds the test binaries built by hack/testbin.sh (versions pinned in hack/testbin.env)."""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTBIN_SCRIPT = REPO_ROOT / "hack" / "testbin.sh"
NAMES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
    "minio",
)


@cache
def testbin_dir() -> Path:
    """The folder of test binaries; builds missing ones (or honours LATENTMAS_TESTBIN)."""
    override = os.environ.get("LATENTMAS_TESTBIN")
    if override:
        folder = Path(override)
    else:
        done = subprocess.run(["bash", str(TESTBIN_SCRIPT)], check=True, capture_output=True, text=True)
        folder = Path(done.stdout.strip().splitlines()[-1])
    missing = [n for n in NAMES if not os.access(folder / n, os.X_OK)]
    if missing:
        raise FileNotFoundError(f"test binaries missing from {folder}: {', '.join(missing)}")
    return folder


def binary(name: str) -> str:
    return str(testbin_dir() / name)
