"""The files stages read at run time (the natural questions, the sample corpus) ship inside the package: the
runtime image installs the project with `pip install .`, where no checkout's `data/` folder exists."""

from __future__ import annotations

import tomllib
from pathlib import Path

from latentmas.jobs.corpus import default_corpus_dir, written_dir
from latentmas.jobs.questions import default_questions_dir

REPO = Path(__file__).resolve().parents[2]


def test_package_data_holds_every_file_the_stages_read_where_the_code_looks() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "latentmas.data" in setuptools["packages"]
    root = REPO / setuptools["package-dir"]["latentmas.data"]
    # Installed, latentmas/jobs/<module>.py looks in latentmas/data/: the folder this package becomes.
    for folder in (default_questions_dir(), default_corpus_dir(), written_dir()):
        assert folder.parent == root, folder
    patterns = setuptools["package-data"]["latentmas.data"]
    shipped = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    folders = (default_questions_dir(), default_corpus_dir(), written_dir())
    read = {p for folder in folders for p in folder.rglob("*") if p.is_file()}
    assert read and read <= shipped, sorted(str(p.relative_to(root)) for p in read - shipped)[:5]
