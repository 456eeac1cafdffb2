"""The bundled corpus's extension: provenance for every file, enough held-out documents per text domain on the
full corpus with the default split and on the demo sample with the demo stack's split, and the project-written
slice (in the demo sample)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from latentmas.jobs.cleaning import doc_id_for
from latentmas.jobs.corpus import (
    DEMO_EXTENSION_FILES,
    CorpusWriter,
    Source,
    corpus_files,
    default_corpus_dir,
    project_documents,
    read_sources,
    upload_corpus,
    widen_demo_sample,
)
from latentmas.jobs.splits import HELDOUT, Document, SplitParams, Splits, assign, group_corpus
from latentmas.localrun import load_stack
from latentmas.spec import SynthesisSpec
from latentmas.testing.fixtures import MinioFixture

from tests.data.test_questions import corpus_sources

TEXT_DOMAINS = ("python", "linux", "licenses")


def test_every_file_has_provenance_and_the_extension_is_outside_the_demo_sample() -> None:
    root = default_corpus_dir()
    sources = {s.path: s for s in read_sources(root)}
    files = {p.relative_to(root).as_posix() for p in corpus_files(root)}
    assert files == set(sources), "a corpus file without a SOURCES.json entry (or the reverse)"
    extension = Counter(s.domain for s in sources.values() if not s.demo)
    assert all(extension[d] >= 50 for d in TEXT_DOMAINS), extension
    assert extension["math"] >= 1
    written = [s for s in sources.values() if s.note == "project-written"]
    assert Counter(s.domain for s in written) == dict.fromkeys((*TEXT_DOMAINS, "math"), 3)
    assert all(s.demo and s.license == "CC0-1.0" for s in written)


def test_the_committed_demo_sample_is_the_widening_rule_applied() -> None:
    root = default_corpus_dir()
    sources = read_sources(root)
    assert widen_demo_sample(root, sources) == sources, "SOURCES.json's demo flags differ from widen_demo_sample"


def test_widening_takes_the_smallest_extension_files_by_size_alone(tmp_path: Path) -> None:
    sizes = {f"linux/page{i}.txt": 100 * (9 - i) for i in range(9)}
    for rel, size in sizes.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x" * size)
    sources = [Source(rel, "linux", "o", "l", "txt", demo=False, extension=True) for rel in sizes]
    widened = widen_demo_sample(tmp_path, [*sources[:1], replace(sources[1], note="project-written"), *sources[2:]], 3)
    assert sorted(s.path for s in widened if s.demo) == ["linux/page1.txt", "linux/page6.txt", "linux/page7.txt",
                                                          "linux/page8.txt"]  # fmt: skip
    assert DEMO_EXTENSION_FILES >= 15


def test_the_full_corpus_holds_out_fifteen_documents_per_text_domain() -> None:
    docs = [Document(doc_id_for(key), key.split("/")[0], text) for key, text in corpus_sources().items()]
    params = SplitParams.of(SynthesisSpec())
    splits = assign(docs, group_corpus(docs, params), Splits({}, {}, {}, {}), params, "c1")
    held = Counter(d.domain for d in docs if splits.split[d.doc_id] == HELDOUT)
    assert all(held[d] >= 15 for d in (*TEXT_DOMAINS, "math")), held


def test_the_demo_sample_holds_out_fifteen_documents_per_text_domain_with_the_demo_split() -> None:
    """The parser's documents of the demo sample, exact copies dropped as cleaning drops them, split with
    core/demo-stack.yaml's settings: the gate's interval needs >= 15 held-out documents per domain."""
    root = default_corpus_dir()
    sample = {s.path for s in read_sources(root) if s.demo}
    texts = {key: text for key, text in corpus_sources().items() if key.split("#")[0] in sample}
    unique = {text: key for key, text in sorted(texts.items(), reverse=True)}
    docs = [Document(doc_id_for(key), key.split("/")[0], text) for text, key in sorted(unique.items())]
    demo = load_stack(Path(__file__).resolve().parents[2] / "core" / "demo-stack.yaml")
    params = SplitParams.of(demo.spec.pipeline.synthesis)
    splits = assign(docs, group_corpus(docs, params), Splits({}, {}, {}, {}), params, "c1")
    held = Counter(d.domain for d in docs if splits.split[d.doc_id] == HELDOUT)
    minimum = demo.spec.pipeline.synthesis.min_heldout_documents
    assert minimum >= 15 and all(held[d] >= minimum for d in (*TEXT_DOMAINS, "math")), held


def test_upload_sends_the_demo_sample_unless_full(minio: MinioFixture) -> None:
    root = default_corpus_dir()
    demo = upload_corpus(minio.store, "raw", root, "growth-demo/")
    full = upload_corpus(minio.store, "raw", root, "growth-full/", full=True)
    sample = {s.path for s in read_sources(root) if s.demo}
    assert {k.removeprefix("growth-demo/") for k in demo} == sample
    assert len(full) == len(list(corpus_files(root))) > len(demo)


def test_the_project_written_documents_are_copied_wherever_the_corpus_is_generated(tmp_path: Path) -> None:
    writer = CorpusWriter(tmp_path / "elsewhere" / "out", seed=0, demo=False)
    project_documents(writer)
    copied = {s.path for s in writer.sources}
    assert len(copied) >= 12 and all(Path(p).name.startswith("latentmas-") for p in copied), copied
    for rel in copied:  # the committed corpus holds the same bytes
        assert (writer.root / rel).read_bytes() == (default_corpus_dir() / rel).read_bytes(), rel
