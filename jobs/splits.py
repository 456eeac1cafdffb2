"""Train / held-out splits by document group, stored per stack and stable across cycles.

Documents are grouped by near-duplication at a lower threshold than cleaning's (`splitJaccard`, 0.5 by
default: a pair cleaning keeps as two documents can still share most of its text): banded MinHash LSH
(`latentmas.jobs.minhash` signatures, 40 bands of 3 rows, so a pair at Jaccard 0.5 is a candidate with
probability 0.995) finds candidate pairs, their exact Jaccard verifies them, and union-find merges them in
descending similarity, refusing a merge that would grow a group past `maxGroupDocuments` (templated math
problems would otherwise chain into one component). A whole group lands on one side.

`<artifacts>/<namespace>/<stack>/splits.json` records every document's split with the stack uid. Old
documents never move: a new document joins the split of the old documents of its group; a new group is
held out when the hash of its smallest doc_id falls below `holdoutFraction` (and, when a domain would have
no held-out document, its lowest-hash new group is held out). A new document that joins groups already on
both sides is `excluded` (neither trained on nor evaluated). The assignment is a pure function of the
previous file and the corpus, so every stage that needs it (synth, index, base) computes the same result
and writing the file again is harmless.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from latentmas.jobs.cleaning import shingles
from latentmas.jobs.minhash import band_keys, jaccard, signature
from latentmas.spec import SynthesisSpec
from latentmas.stage import StageContext
from latentmas.training.data import read_corpus_frame

SPLITS_FILE = "splits.json"
SPLITS_VERSION = 1
SPLIT_BANDS, SPLIT_ROWS = 40, 3
TRAIN, HELDOUT, EXCLUDED = "train", "heldout", "excluded"


@dataclass(frozen=True)
class SplitParams:
    """The knobs of the grouping and of assigning new groups (from `pipeline.synthesis`)."""

    threshold: float
    max_group: int
    fraction: float
    seed: int

    @classmethod
    def of(cls, spec: SynthesisSpec) -> SplitParams:
        return cls(spec.split_jaccard, spec.max_group_documents, spec.holdout_fraction, spec.seed)


@dataclass(frozen=True)
class Document:
    doc_id: str
    domain: str
    text: str


@dataclass
class Splits:
    """Every document's split (old ones included, even when gone from the corpus) and its group."""

    split: dict[str, str]
    domain: dict[str, str]
    group: dict[str, str]
    since: dict[str, str]  # doc_id -> cycle that first assigned it

    def of(self, split: str) -> set[str]:
        return {d for d, s in self.split.items() if s == split}

    def as_json(self, stack_uid: str | None, params: SplitParams) -> dict[str, Any]:
        docs = {
            d: {"split": s, "domain": self.domain[d], "group": self.group[d], "since": self.since[d]}
            for d, s in sorted(self.split.items())
        }
        return {"version": SPLITS_VERSION, "stackUid": stack_uid, "params": params.__dict__, "documents": docs}


def split_value(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from a key and the seed (the same hash the synth stage always used)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) / float(1 << 64)


# ---- grouping -------------------------------------------------------------------------------------------
def similar_pairs(features: Mapping[str, Sequence[int]], threshold: float) -> list[tuple[float, str, str]]:
    """(jaccard, a, b) with a < b for every verified pair at or above `threshold`, most similar first."""
    buckets: dict[int, list[str]] = defaultdict(list)
    for doc_id in sorted(features):
        if features[doc_id]:
            for key in band_keys(signature(features[doc_id]), SPLIT_BANDS, SPLIT_ROWS):
                buckets[key].append(doc_id)
    candidates = {(a, b) for ids in buckets.values() for i, a in enumerate(ids) for b in ids[i + 1 :]}
    pairs = [(jaccard(features[a], features[b]), a, b) for a, b in candidates]
    return sorted(((j, a, b) for j, a, b in pairs if j >= threshold), key=lambda p: (-p[0], p[1], p[2]))


def group_documents(doc_ids: Iterable[str], pairs: Iterable[tuple[float, str, str]], max_group: int) -> dict[str, str]:
    """doc_id -> group id (its smallest doc_id): union-find over the pairs in order, no group above `max_group`."""
    parent = {d: d for d in doc_ids}
    size = dict.fromkeys(parent, 1)

    def root(d: str) -> str:
        while parent[d] != d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    for _, a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb and size[ra] + size[rb] <= max_group:
            keep, gone = min(ra, rb), max(ra, rb)
            parent[gone] = keep
            size[keep] += size[gone]
    return {d: root(d) for d in parent}


def group_corpus(docs: Sequence[Document], params: SplitParams) -> dict[str, str]:
    features = {d.doc_id: shingles(d.text) for d in docs}
    return group_documents(features, similar_pairs(features, params.threshold), params.max_group)


# ---- assignment -----------------------------------------------------------------------------------------
def assign(
    docs: Sequence[Document], groups: Mapping[str, str], previous: Splits, params: SplitParams, cycle: str
) -> Splits:
    """The previous assignment extended to `docs` (old documents keep their split; see the module doc)."""
    out = Splits(dict(previous.split), dict(previous.domain), dict(previous.group), dict(previous.since))
    members: dict[str, list[Document]] = defaultdict(list)
    for doc in docs:
        members[groups[doc.doc_id]].append(doc)
    fresh: list[str] = []
    for group, items in sorted(members.items()):
        old = {previous.split[d.doc_id] for d in items if d.doc_id in previous.split} - {EXCLUDED}
        new = [d for d in items if d.doc_id not in previous.split]
        if not old:
            if new:
                fresh.append(group)
            continue
        split = old.pop() if len(old) == 1 else EXCLUDED
        for doc in new:
            out.split[doc.doc_id] = split
    for group in fresh:
        split = HELDOUT if split_value(group, params.seed) < params.fraction else TRAIN
        out.split.update({d.doc_id: split for d in members[group] if d.doc_id not in previous.split})
    _hold_one_out_per_domain(out, members, fresh, previous.split, params.seed)
    for doc in docs:
        out.domain[doc.doc_id] = doc.domain
        out.group[doc.doc_id] = groups[doc.doc_id]
        out.since.setdefault(doc.doc_id, cycle)
    return out


def _hold_one_out_per_domain(
    out: Splits, members: Mapping[str, list[Document]], fresh: list[str], previous: Mapping[str, str], seed: int
) -> None:
    """A domain with no held-out document gets its lowest-hash new group held out, when it keeps a train group."""
    by_domain: dict[str, list[str]] = defaultdict(list)
    for group, items in members.items():
        for domain in sorted({d.domain for d in items}):
            by_domain[domain].append(group)
    for domain, domain_groups in sorted(by_domain.items()):
        splits = {out.split[d.doc_id] for g in domain_groups for d in members[g] if d.domain == domain}
        candidates = sorted((g for g in domain_groups if g in fresh), key=lambda g: split_value(g, seed))
        if HELDOUT in splits or not candidates or len(domain_groups) < 2:
            continue
        chosen = candidates[0]
        if any(out.split[d.doc_id] == TRAIN for g in domain_groups if g != chosen for d in members[g]):
            out.split.update({d.doc_id: HELDOUT for d in members[chosen] if d.doc_id not in previous})


def heldout_shortfall(domain: str, docs: Sequence[Document], splits: Splits, minimum: int) -> str | None:
    """Why a domain cannot carry an expert's evaluation this cycle, or None when it has enough held out."""
    mine = [d.doc_id for d in docs if d.domain == domain]
    held = sum(1 for d in mine if splits.split.get(d) == HELDOUT)
    if held >= minimum:
        return None
    groups = len({splits.group[d] for d in mine})
    if held:
        return f"domain {domain!r} has {held} held-out document(s), fewer than minHeldoutDocuments {minimum}"
    if groups < 2:
        grouped = "" if groups == len(mine) else f" in {groups} near-duplicate group"
        return f"domain {domain!r} has {len(mine)} document(s){grouped}: too few for a held-out split"
    return f"domain {domain!r} has no held-out document: its {groups} groups were all assigned to train before"


# ---- the stored file ------------------------------------------------------------------------------------
def splits_key(ctx: StageContext) -> str:
    return f"{ctx.config.namespace}/{ctx.config.stack}/{SPLITS_FILE}"


def parse_splits(raw: Mapping[str, Any], where: str, stack_uid: str | None) -> tuple[Splits, str | None]:
    """The stored splits and, when they belong to another stack instance, why they were set aside."""
    if raw.get("version") != SPLITS_VERSION:
        raise ValueError(f"{where}: unsupported splits version {raw.get('version')!r} (expected {SPLITS_VERSION})")
    empty = Splits({}, {}, {}, {})
    if raw.get("stackUid") and stack_uid and raw["stackUid"] != stack_uid:
        return empty, f"{where} belonged to stack uid {raw['stackUid']}; assigned afresh for {stack_uid}"
    docs: dict[str, dict[str, str]] = raw.get("documents", {})
    return Splits(
        {d: v["split"] for d, v in docs.items()},
        {d: v["domain"] for d, v in docs.items()},
        {d: v["group"] for d, v in docs.items()},
        {d: v["since"] for d, v in docs.items()},
    ), None


def load_splits(ctx: StageContext) -> tuple[Splits, str | None]:
    key = splits_key(ctx)
    if not ctx.store.exists(ctx.bucket, key):
        return Splits({}, {}, {}, {}), None
    return parse_splits(json.loads(ctx.store.get_bytes(ctx.bucket, key)), f"{ctx.bucket}/{key}", ctx.config.stack_uid)


def corpus_documents(ctx: StageContext) -> list[Document]:
    """The cleaned corpus of this cycle (the clean stage must have finished), in doc_id order."""
    frame = read_corpus_frame(ctx, ["doc_id", "domain", "text"])
    return [Document(str(r[0]), str(r[1]), str(r[2])) for r in frame.iter_rows()]


def ensure_splits(ctx: StageContext, docs: Sequence[Document]) -> tuple[Splits, dict[str, Any]]:
    """This cycle's splits (stored at stack level, extended with new documents) and what to report."""
    params = SplitParams.of(ctx.spec.pipeline.synthesis)
    previous, reset = load_splits(ctx)
    current = {d.doc_id for d in docs}
    if current <= previous.split.keys():  # nothing new (another stage of this cycle assigned it): no regrouping
        splits, groups = previous, {d: previous.group[d] for d in current}
    else:
        groups = group_corpus(docs, params)
        splits = assign(docs, groups, previous, params, ctx.config.cycle_id)
    body = json.dumps(splits.as_json(ctx.config.stack_uid, params), indent=1, sort_keys=True).encode()
    ctx.store.put_bytes(ctx.bucket, splits_key(ctx), body)
    sizes = sorted(Counter(groups.values()).values(), reverse=True)
    report: dict[str, Any] = {
        "key": f"{ctx.bucket}/{splits_key(ctx)}",
        "sha256": hashlib.sha256(body).hexdigest(),
        "newDocuments": len(current - set(previous.split)),
        "groups": len(sizes),
        "largestGroup": sizes[0] if sizes else 0,
        **{name: len(splits.of(name) & current) for name in (TRAIN, HELDOUT, EXCLUDED)},
    }
    if reset:
        report["reset"] = reset
    return splits, report


def train_texts(ctx: StageContext, max_chars: int) -> list[str]:
    """Texts of the train split only (up to `max_chars` in all, doc_id order): what a bootstrapped base
    pre-trains on, so held-out documents are never in its data."""
    docs = corpus_documents(ctx)
    splits, _ = ensure_splits(ctx, docs)
    texts: list[str] = []
    total = 0
    for doc in docs:
        if total >= max_chars:
            break
        if splits.split.get(doc.doc_id) == TRAIN:
            texts.append(doc.text)
            total += len(doc.text)
    return texts
