"""The previous release of this repository, runnable beside this checkout: `git archive <rev>` unpacked into
a folder whose `core/` is linked as the `latentmas` package first on PYTHONPATH (this venv's packages for
everything else), so a process started with `Release.env()` imports that release's code, not this one's."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

# main when issue 14 (Kubernetes hardening) was filed: the release whose stacks an upgrade must keep.
PREVIOUS_RELEASE = "8d92e8b"


@dataclass(frozen=True)
class Release:
    rev: str
    root: Path  # the release's files
    pythonpath: Path  # holds `latentmas` -> root/core

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.pythonpath)}

    def crd(self) -> Path:
        return self.root / "crds" / "latentmasstack.yaml"

    def imported_from(self) -> Path:
        """Where a process with `env()` finds `latentmas` (proves the old code, not this checkout, runs)."""
        done = subprocess.run(
            [sys.executable, "-c", "import latentmas; print(latentmas.__file__)"],
            env={**os.environ, **self.env()},
            cwd=self.root,
            capture_output=True,
            text=True,
            check=True,
        )
        return Path(done.stdout.strip()).resolve()


def has_history(repo: Path) -> bool:
    """A checkout with git metadata (a source tarball has none, and so no earlier release to test against)."""
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--git-dir"], capture_output=True, text=True)
    return done.returncode == 0


def materialise(repo: Path, rev: str, dest: Path) -> Release:
    """Unpacks `rev` of `repo` into `dest/src` and links its package; one line if the commit is missing."""
    done = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev], capture_output=True)
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"git archive {rev}: {' '.join(reason)} (a shallow clone lacks it: git fetch --unshallow)")
    root, pythonpath = dest / "src", dest / "path"
    root.mkdir(parents=True)
    pythonpath.mkdir()
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(root, filter="tar")
    (pythonpath / "latentmas").symlink_to(root / "core", target_is_directory=True)
    return Release(rev, root, pythonpath)
