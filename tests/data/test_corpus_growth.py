"""The bundled corpus's extension: provenance for every file, the demo sample unchanged, enough held-out
documents per text domain on the full corpus with the default split, and the project-written slice."""

from __future__ import annotations

from collections import Counter

from latentmas.jobs.cleaning import doc_id_for
from latentmas.jobs.corpus import corpus_files, default_corpus_dir, read_sources, upload_corpus
from latentmas.jobs.splits import HELDOUT, Document, SplitParams, Splits, assign, group_corpus
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
    assert all(not s.demo and s.license == "CC0-1.0" for s in written)


def test_the_full_corpus_holds_out_fifteen_documents_per_text_domain() -> None:
    docs = [Document(doc_id_for(key), key.split("/")[0], text) for key, text in corpus_sources().items()]
    params = SplitParams.of(SynthesisSpec())
    splits = assign(docs, group_corpus(docs, params), Splits({}, {}, {}, {}), params, "c1")
    held = Counter(d.domain for d in docs if splits.split[d.doc_id] == HELDOUT)
    assert all(held[d] >= 15 for d in (*TEXT_DOMAINS, "math")), held


def test_upload_sends_the_demo_sample_unless_full(minio: MinioFixture) -> None:
    root = default_corpus_dir()
    demo = upload_corpus(minio.store, "raw", root, "growth-demo/")
    full = upload_corpus(minio.store, "raw", root, "growth-full/", full=True)
    sample = {s.path for s in read_sources(root) if s.demo}
    assert {k.removeprefix("growth-demo/") for k in demo} == sample
    assert len(full) == len(list(corpus_files(root))) > len(demo)
