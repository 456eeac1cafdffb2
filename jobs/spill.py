"""Cleaned documents spilled to disk while the python engine reads the raw objects (SQLite in the
stage's workdir), then read back in source order: the dedupe pass and the output writers stream
them, so the stage's memory does not grow with the corpus."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from latentmas.jobs.cleaning import Chunk, CleanDoc


class DocSpill:
    SCHEMA = (
        "CREATE TABLE docs (source TEXT PRIMARY KEY, domain TEXT NOT NULL, content_hash TEXT NOT NULL, "
        "shingles BLOB NOT NULL, doc TEXT NOT NULL)"
    )

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(str(path))
        self.conn.execute(self.SCHEMA)

    def add(self, doc: CleanDoc) -> None:
        body = asdict(doc)
        del body["shingles"]
        shingles = np.asarray(doc.shingles, dtype="<i4").tobytes()
        self.conn.execute(
            "INSERT INTO docs VALUES (?, ?, ?, ?, ?)",
            (doc.source, doc.domain, doc.content_hash, shingles, json.dumps(body)),
        )

    def commit(self) -> None:
        self.conn.commit()

    def hashes(self) -> Iterator[tuple[str, str, str, list[int]]]:
        """(source, domain, content hash, shingles) of every document, in source order."""
        for source, domain, content_hash, blob in self.conn.execute(
            "SELECT source, domain, content_hash, shingles FROM docs ORDER BY source"
        ):
            yield source, domain, content_hash, np.frombuffer(blob, dtype="<i4").tolist()

    def shingles(self, source: str) -> list[int]:
        row = self.conn.execute("SELECT shingles FROM docs WHERE source = ?", (source,)).fetchone()
        return np.frombuffer(row[0], dtype="<i4").tolist()

    def docs(self) -> Iterator[CleanDoc]:
        """Every document in source order (without shingles)."""
        for (text,) in self.conn.execute("SELECT doc FROM docs ORDER BY source"):
            body = json.loads(text)
            body["chunks"] = [Chunk(**c) for c in body["chunks"]]
            yield CleanDoc(**body)

    def close(self) -> None:
        self.conn.close()
