"""The natural-question set: hand-written questions per bundled domain with document-level relevance.

`data/questions/<domain>.jsonl` holds one object per line: `id`, `question` (phrased as a user would ask,
not assembled from a chunk's words), `domain`, `relevant` (raw object keys relative to the stage's raw
prefix, e.g. `python/json.txt` or `math/problems-0.jsonl#1`: the clean stage's `source` of a document, whose
`doc_id` is a hash of it) and `half` (`tune` | `test`, fixed in the file: parameters are tuned on one half
and reported on the other). Provenance: docs/data.md, "Natural questions".

Which relevant documents count depends on the use:
- retrieval evaluation: every relevant document counts, whatever its split (any chunk of it is a hit);
- expert and router evaluation: only questions whose relevant documents (those the corpus holds) all lie in
  the held-out split, so no expert was trained on the answer (`heldout_questions`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from latentmas.jobs.cleaning import doc_id_for

HALVES = ("tune", "test")
Half = Literal["tune", "test"]


@dataclass(frozen=True)
class NaturalQuestion:
    """One hand-written question and the documents that answer it."""

    id: str
    question: str
    domain: str
    relevant: tuple[str, ...]  # raw object keys relative to the raw prefix
    half: Half

    def relevant_doc_ids(self, raw_prefix: str = "") -> frozenset[str]:
        """The clean stage's `doc_id`s of the relevant documents (the key is `raw_prefix` + path)."""
        return frozenset(doc_id_for(raw_prefix + path) for path in self.relevant)


def default_questions_dir() -> Path:
    """The committed question set (data/questions at the repository root; `latentmas/data/questions` when
    installed)."""
    return Path(__file__).resolve().parent.parent / "data" / "questions"


def parse_question(line: str, where: str) -> NaturalQuestion:
    """One JSONL line as a question; a one-line error naming the place and the field otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for name in ("id", "question", "domain"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise ValueError(f"{where}: field {name!r} must be a non-empty string")
    relevant = row.get("relevant")
    if not isinstance(relevant, list) or not relevant or not all(isinstance(r, str) and r for r in relevant):
        raise ValueError(f"{where}: field 'relevant' must be a non-empty list of document paths")
    if row.get("half") not in HALVES:
        raise ValueError(f"{where}: field 'half' must be one of {HALVES}, got {row.get('half')!r}")
    return NaturalQuestion(row["id"], row["question"], row["domain"], tuple(relevant), cast(Half, row["half"]))


def read_questions(path: Path) -> list[NaturalQuestion]:
    """Every question of one JSONL file, checked to belong to the file's domain and to have unique ids."""
    out: list[NaturalQuestion] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        question = parse_question(line, f"{path}:{number}")
        if question.domain != path.stem:
            raise ValueError(f"{path}:{number}: domain {question.domain!r} differs from the file's {path.stem!r}")
        if question.id in seen:
            raise ValueError(f"{path}:{number}: duplicate id {question.id!r}")
        seen.add(question.id)
        out.append(question)
    return out


def load_natural_questions(domains: Iterable[str] | None = None, folder: Path | None = None) -> list[NaturalQuestion]:
    """The natural questions of `domains` (all bundled domains when None), in domain then file order.
    A domain without a question file has no questions (a user's own domain), which callers report."""
    root = folder or default_questions_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"natural-question folder {root} does not exist")
    names = sorted(p.stem for p in root.glob("*.jsonl")) if domains is None else sorted(set(domains))
    out: list[NaturalQuestion] = []
    for name in names:
        path = root / f"{name}.jsonl"
        if path.is_file():
            out.extend(read_questions(path))
    return out


def heldout_questions(
    questions: Iterable[NaturalQuestion],
    corpus_doc_ids: Collection[str],
    heldout: Collection[str],
    raw_prefix: str = "",
) -> list[NaturalQuestion]:
    """Questions fit to evaluate experts: their relevant documents that the corpus holds are all held out
    (and there is at least one), so no expert trained on an answer."""
    out = []
    for question in questions:
        present = question.relevant_doc_ids(raw_prefix) & set(corpus_doc_ids)
        if present and present <= set(heldout):
            out.append(question)
    return out
