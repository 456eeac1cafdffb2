"""Splits by near-duplicate group: no group crosses splits, templated text does not chain into one group,
assignments are stored per stack and never move when documents are added, a domain without enough
held-out material is named with its reason."""

from __future__ import annotations

import json
import random

import pytest
from latentmas.jobs.cleaning import doc_id_for, shingles
from latentmas.jobs.corpus import default_corpus_dir
from latentmas.jobs.minhash import dedupe, jaccard
from latentmas.jobs.splits import (
    EXCLUDED,
    HELDOUT,
    TRAIN,
    Document,
    SplitParams,
    Splits,
    assign,
    corpus_documents,
    ensure_splits,
    group_corpus,
    heldout_shortfall,
    splits_key,
    train_texts,
)
from latentmas.spec import LatentMASStackSpec
from latentmas.stage import StageConfig, run_stage, stage_context
from latentmas.testing.fixtures import MinioFixture

from tests.data.conftest import stage_config

PARAMS = SplitParams(threshold=0.5, max_group=64, fraction=0.3, seed=0)
WORDS = [f"w{i}" for i in range(5000)]


def family(rng: random.Random, name: str, variants: int, edit: float, domain: str = "d") -> list[Document]:
    """`variants` copies of one random 300-word text with a share `edit` of its words replaced."""
    base = [rng.choice(WORDS) for _ in range(300)]
    out = []
    for v in range(variants):
        words = list(base)
        for i in rng.sample(range(300), int(300 * edit) if v else 0):
            words[i] = rng.choice(WORDS)
        out.append(Document(doc_id_for(f"{domain}/{name}-{v}.txt"), domain, " ".join(words)))
    return out


def empty() -> Splits:
    return Splits({}, {}, {}, {})


def test_near_duplicates_below_the_cleaning_threshold_stay_on_one_side() -> None:
    rng = random.Random(5)
    families = [family(rng, f"f{i}", 3, 0.04) for i in range(40)]
    a, b = (shingles(d.text) for d in families[0][:2])
    assert 0.5 <= jaccard(a, b) < 0.8, "the pair must be a near duplicate that cleaning keeps"
    assert not dedupe([(d.doc_id, shingles(d.text)) for d in families[0]], 0.8).dropped
    docs = [d for f in families for d in f]
    groups = group_corpus(docs, PARAMS)
    splits = assign(docs, groups, empty(), PARAMS, "c1")
    assert {splits.split[d.doc_id] for d in docs} == {TRAIN, HELDOUT}
    for members in families:
        assert len({groups[d.doc_id] for d in members}) == 1
        assert len({splits.split[d.doc_id] for d in members}) == 1, "a near-duplicate group crosses splits"


def test_templated_math_is_sub_clustered_not_chained() -> None:
    path = default_corpus_dir() / "math/problems-0.jsonl"
    docs = [
        Document(doc_id_for(f"math/problems-0.jsonl#{n}"), "math", json.loads(line)["text"])
        for n, line in enumerate(path.read_text().splitlines(), 1)
    ]
    chained = group_corpus(docs, SplitParams(0.5, len(docs), 0.3, 0))
    capped = group_corpus(docs, SplitParams(0.5, 16, 0.3, 0))
    sizes = lambda groups: sorted((list(groups.values()).count(g) for g in set(groups.values())), reverse=True)  # noqa: E731
    assert sizes(chained)[0] > 16, "the math problems should chain without a cap (else this test proves nothing)"
    assert sizes(capped)[0] <= 16
    splits = assign(docs, capped, empty(), SplitParams(0.5, 16, 0.3, 0), "c1")
    assert len(splits.of(HELDOUT)) >= 15 and len(splits.of(TRAIN)) >= 15


def test_old_documents_never_move_and_new_near_copies_follow_them() -> None:
    rng = random.Random(9)
    first = [d for i in range(30) for d in family(rng, f"f{i}", 2, 0.04)]
    one = assign(first, group_corpus(first, PARAMS), empty(), PARAMS, "c1")
    # new documents: near copies of old ones (both splits) and unrelated new families
    held = next(d for d in first if one.split[d.doc_id] == HELDOUT)
    kept = next(d for d in first if one.split[d.doc_id] == TRAIN)
    copies = [
        Document(doc_id_for(f"d/copy-of-{d.doc_id}.txt"), "d", d.text.replace(d.text.split()[7], "changed", 1))
        for d in (held, kept)
    ]
    added = copies + [d for i in range(30, 60) for d in family(rng, f"f{i}", 2, 0.04)]
    # a higher fraction and another seed: parameters only decide new groups
    later = SplitParams(0.5, 64, 0.45, 3)
    two = assign(first + added, group_corpus(first + added, later), one, later, "c2")
    assert all(two.split[d.doc_id] == one.split[d.doc_id] for d in first)
    assert two.split[copies[0].doc_id] == HELDOUT and two.split[copies[1].doc_id] == TRAIN
    assert {two.split[d.doc_id] for d in added[2:]} == {TRAIN, HELDOUT}
    assert all(two.since[d.doc_id] == "c1" for d in first) and two.since[copies[0].doc_id] == "c2"
    again = assign(first + added, group_corpus(first + added, later), two, later, "c3")
    assert again.split == two.split, "assigning the same corpus again changes nothing"


def test_a_new_document_bridging_both_sides_is_excluded() -> None:
    rng = random.Random(2)
    left, right = family(rng, "left", 1, 0), family(rng, "right", 1, 0)
    first = left + right
    previous = Splits({left[0].doc_id: TRAIN, right[0].doc_id: HELDOUT}, {}, {}, {})
    half = left[0].text.split()[:150] + right[0].text.split()[150:]
    bridge = Document(doc_id_for("d/bridge.txt"), "d", " ".join(half))
    # a loose threshold so the half-and-half document links both
    loose = SplitParams(0.3, 64, 0.3, 0)
    docs = [*first, bridge]
    out = assign(docs, group_corpus(docs, loose), previous, loose, "c2")
    assert out.split[bridge.doc_id] == EXCLUDED
    assert out.split[left[0].doc_id] == TRAIN and out.split[right[0].doc_id] == HELDOUT


def test_each_domain_with_two_groups_gets_a_heldout_group_and_tiny_domains_are_named() -> None:
    rng = random.Random(4)
    big = [d for i in range(12) for d in family(rng, f"b{i}", 1, 0, "big")]
    pair = family(rng, "p", 1, 0, "pair") + family(rng, "q", 1, 0, "pair")
    twins = family(rng, "t", 2, 0.04, "twins")  # two documents, one group
    single = family(rng, "s", 1, 0, "single")
    docs = big + pair + twins + single
    params = SplitParams(0.5, 64, 0.05, 0)
    splits = assign(docs, group_corpus(docs, params), empty(), params, "c1")
    assert heldout_shortfall("big", docs, splits, 1) is None
    assert heldout_shortfall("pair", docs, splits, 1) is None
    assert (
        heldout_shortfall("single", docs, splits, 1)
        == "domain 'single' has 1 document(s): too few for a held-out split"
    )
    assert heldout_shortfall("twins", docs, splits, 1) == (
        "domain 'twins' has 2 document(s) in 1 near-duplicate group: too few for a held-out split"
    )
    assert heldout_shortfall("big", docs, splits, 99) == (
        f"domain 'big' has {len(splits.of(HELDOUT) & {d.doc_id for d in big})} held-out document(s), "
        "fewer than minHeldoutDocuments 99"
    )
    assert (
        heldout_shortfall("missing", docs, splits, 1)
        == "domain 'missing' has 0 document(s): too few for a held-out split"
    )


# ---- stored per stack, through the real clean stage and MinIO ----------------------------------------------
def clean_cycle(minio: MinioFixture, cycle: str, uid: str | None = "uid-1") -> StageConfig:
    config = stage_config(minio.storage, cycle, {"cleaning": {"engine": "python", "rawPrefix": "splits-raw/"}})
    config = config.model_copy(update={"stack": "split-tests", "stack_uid": uid})
    run_stage("clean", config, minio.store)
    return config


def put_docs(minio: MinioFixture, docs: list[Document], names: list[str]) -> None:
    for doc, name in zip(docs, names, strict=True):
        minio.store.put_bytes("raw", f"splits-raw/{name}", (doc.text + ".\n").encode())


def test_stored_splits_are_stable_across_cycles_and_the_base_reads_only_train(minio: MinioFixture) -> None:
    rng = random.Random(3)
    docs = [d for i in range(12) for d in family(rng, f"f{i}", 2, 0.04, "alpha")]
    put_docs(minio, docs, [f"alpha/f{i}-{v}.txt" for i in range(12) for v in range(2)])
    config = clean_cycle(minio, "c1")
    with stage_context("synth", config, minio.store) as ctx:
        first, report = ensure_splits(ctx, corpus_documents(ctx))
        stored = json.loads(minio.store.get_bytes("artifacts", splits_key(ctx)))
        assert stored["stackUid"] == "uid-1" and report["newDocuments"] == len(docs) == len(stored["documents"])
        assert report[HELDOUT] > 0 and report[TRAIN] > 0
        texts = train_texts(ctx, 10**9)
        held_texts = {d.text for d in corpus_documents(ctx) if first.split[d.doc_id] == HELDOUT}
        assert texts and not held_texts & set(texts), "a held-out document reached the base's pre-training data"

    more = [d for i in range(12, 24) for d in family(rng, f"f{i}", 1, 0, "alpha")]
    put_docs(minio, more, [f"alpha/f{i}-0.txt" for i in range(12, 24)])
    config = clean_cycle(minio, "c2")
    with stage_context("synth", config, minio.store) as ctx:
        second, report = ensure_splits(ctx, corpus_documents(ctx))
    assert report["newDocuments"] == 12
    assert all(second.split[d] == s for d, s in first.split.items()), "an old document moved"

    other = clean_cycle(minio, "c3", uid="uid-2")  # the stack was deleted and created again
    with stage_context("synth", other, minio.store) as ctx:
        _, report = ensure_splits(ctx, corpus_documents(ctx))
    assert report["reset"].endswith("belonged to stack uid uid-1; assigned afresh for uid-2")
    assert report["newDocuments"] == 36


def test_an_unknown_splits_version_is_refused_in_one_line(minio: MinioFixture) -> None:
    config = clean_cycle(minio, "v1").model_copy(update={"stack": "split-version"})
    with stage_context("synth", config, minio.store) as ctx:
        minio.store.put_bytes("artifacts", splits_key(ctx), json.dumps({"version": 99}).encode())
        with pytest.raises(
            ValueError, match=r"split-version/splits.json: unsupported splits version 99 \(expected 1\)"
        ):
            ensure_splits(ctx, [])


def test_synth_skips_only_the_experts_of_missing_or_tiny_domains(minio: MinioFixture) -> None:
    root = default_corpus_dir()
    python = ["json.txt", "csv.md", "heapq.txt", "glob.txt", "uuid.txt", "queue.txt", "random.txt", "string.md"]
    files = [f"python/{name}" for name in python] + ["linux/ls.txt", "linux/ls-edited.txt"]  # a near copy: one doc
    for rel in files:
        minio.store.put_bytes("raw", f"skips-raw/{rel}", (root / rel).read_bytes())
    spec = LatentMASStackSpec.model_validate(
        {
            "storage": minio.storage.model_dump(by_alias=True),
            "experts": [{"name": d, "domain": d} for d in ("python", "linux", "legal")],
            "pipeline": {"cleaning": {"engine": "python", "rawPrefix": "skips-raw/"}},
        }
    )
    config = StageConfig(stack="skip-tests", cycle_id="skips", spec=spec)
    for stage in ("clean", "quant"):
        run_stage(stage, config, minio.store)
    synth = run_stage("synth", config, minio.store)
    assert synth["metrics"]["skippedDomains"] == {
        "legal": "domain 'legal' has no cleaned documents",
        "linux": "domain 'linux' has 1 document(s): too few for a held-out split",
    }
    assert synth["counts"]["python_train"] > 0 and synth["counts"]["python_heldout"] > 0
