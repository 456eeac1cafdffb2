"""registry.json writes are conditional on what was read: two promotions, or a promotion and a
rollback, racing on the real MinIO and on the folder store never lose a change; a writer that does
not retry fails loudly with RegistryConflict."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from latentmas.registry import (
    ArtifactEntry,
    ArtifactVersion,
    Registry,
    RegistryConflict,
    claim_version,
    load_registry,
    registry_key,
    save_registry,
    update_registry,
    version_prefix,
)
from latentmas.store import LocalStore, ObjectStore, PreconditionFailed, sha256_bytes
from latentmas.testing.fixtures import MinioFixture
from latentmas.training.registryops import rollback

BUCKET, NAMESPACE = "artifacts", "race"


@pytest.fixture(params=["minio", "folder"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "minio":
        minio: MinioFixture = request.getfixturevalue("minio")
        return minio.store
    local = LocalStore(tmp_path / "store")
    local.ensure_bucket(BUCKET)
    return local


class WritesTogether:
    """The real store, except that the first registry.json write of each thread waits until every
    racing thread has read the registry and reached its write: the interleaving a race needs."""

    def __init__(self, store: ObjectStore, parties: int) -> None:
        self.store = store
        self.barrier = threading.Barrier(parties, timeout=60)
        self.waited: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def put_bytes_if(self, bucket: str, key: str, data: bytes, etag: str | None) -> str:
        if key.endswith("registry.json") and threading.get_ident() not in self.waited:
            self.waited.add(threading.get_ident())
            self.barrier.wait()
        return self.store.put_bytes_if(bucket, key, data, etag)


def promote(store: Any, stack: str, name: str, payload: bytes) -> Callable[[Registry], Registry]:
    """A promotion as the promote stage does it: claim a version, upload its file, point at it."""
    owner = uuid.uuid4().hex

    def change(read: Registry) -> Registry:
        registry = read.model_copy(deep=True)
        entry = registry.experts.setdefault(name, ArtifactEntry())
        version = claim_version(store, BUCKET, NAMESPACE, stack, "experts", name, entry.next_version(), owner)
        prefix = version_prefix(NAMESPACE, stack, "experts", name, version)
        store.put_bytes(BUCKET, prefix + "adapter.bin", payload)
        files = {"adapter.bin": sha256_bytes(payload)}
        entry.history.append(ArtifactVersion(version=version, prefix=prefix, files=files))
        entry.current = version
        return registry

    return change


def race(*writers: Callable[[], object]) -> list[object]:
    results: list[object] = [None] * len(writers)

    def run(i: int) -> None:
        try:
            results[i] = writers[i]()
        except Exception as err:  # the test inspects what each writer got
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def stack_name(request: pytest.FixtureRequest) -> str:
    return f"{request.node.originalname[5:20]}-{uuid.uuid4().hex[:6]}"


def test_plain_save_of_a_stale_read_fails_loudly(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    stack = stack_name(request)
    save_registry(store, BUCKET, NAMESPACE, stack, Registry())
    first, second = load_registry(store, BUCKET, NAMESPACE, stack), load_registry(store, BUCKET, NAMESPACE, stack)
    save_registry(store, BUCKET, NAMESPACE, stack, first.model_copy(update={"rejected": [{"by": "first"}]}))
    with pytest.raises(RegistryConflict, match=r"registry.json: changed by another writer since revision 1"):
        save_registry(store, BUCKET, NAMESPACE, stack, second.model_copy(update={"rejected": [{"by": "second"}]}))
    # A fresh registry object (never read) may only create, never overwrite.
    with pytest.raises(RegistryConflict):
        save_registry(store, BUCKET, NAMESPACE, stack, Registry())
    final = load_registry(store, BUCKET, NAMESPACE, stack)
    assert (final.revision, final.rejected) == (2, [{"by": "first"}])


def test_conditional_put_on_the_store(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    key = f"{NAMESPACE}/{stack_name(request)}/cond.json"
    etag = store.put_bytes_if(BUCKET, key, b"one", None)
    with pytest.raises(PreconditionFailed):
        store.put_bytes_if(BUCKET, key, b"again", None)  # must not exist
    assert store.get_with_etag(BUCKET, key) == (b"one", etag)
    new = store.put_bytes_if(BUCKET, key, b"two", etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes_if(BUCKET, key, b"stale", etag)
    store.delete(BUCKET, key)
    with pytest.raises(PreconditionFailed):
        store.put_bytes_if(BUCKET, key, b"deleted", new)
    assert not store.exists(BUCKET, key)


def test_two_promotions_racing_both_land(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    stack = stack_name(request)
    racing = WritesTogether(store, 2)
    results = race(
        lambda: update_registry(racing, BUCKET, NAMESPACE, stack, promote(racing, stack, "fin", b"fin-one")),
        lambda: update_registry(racing, BUCKET, NAMESPACE, stack, promote(racing, stack, "fin", b"fin-two")),
    )
    assert all(isinstance(r, Registry) for r in results), results
    final = load_registry(store, BUCKET, NAMESPACE, stack)
    assert final.revision == 2  # two writes, none lost
    history = final.experts["fin"].history
    assert sorted(v.files["adapter.bin"] for v in history) == sorted(
        [sha256_bytes(b"fin-one"), sha256_bytes(b"fin-two")]
    )
    # Each version's folder holds the file its entry names (no writer uploaded into the other's folder).
    for version in history:
        assert sha256_bytes(store.get_bytes(BUCKET, version.prefix + "adapter.bin")) == version.files["adapter.bin"]
    # Two distinct version folders (the loser of the registry write re-claims the next free number; a
    # number it claimed first may stay unused).
    assert len({v.version for v in history}) == 2
    assert final.experts["fin"].current in {v.version for v in history}


def test_promotion_racing_a_rollback_keeps_both(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    stack = stack_name(request)
    for payload in (b"med-1", b"med-2"):
        update_registry(store, BUCKET, NAMESPACE, stack, promote(store, stack, "med", payload))
    start = load_registry(store, BUCKET, NAMESPACE, stack)
    assert start.experts["med"].current == 2
    racing = WritesTogether(store, 2)
    results = race(
        lambda: update_registry(racing, BUCKET, NAMESPACE, stack, promote(racing, stack, "fin", b"fin-1")),
        lambda: rollback(racing, BUCKET, NAMESPACE, stack, "med"),
    )
    assert all(isinstance(r, Registry) for r in results), results
    final = load_registry(store, BUCKET, NAMESPACE, stack)
    assert final.revision == start.revision + 2
    assert final.experts["med"].current == 1  # the rollback
    assert final.experts["fin"].current == 1  # the promotion
    assert final.experts["fin"].history[0].files == {"adapter.bin": sha256_bytes(b"fin-1")}


def test_a_writer_that_keeps_losing_fails_loudly(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    stack = stack_name(request)
    save_registry(store, BUCKET, NAMESPACE, stack, Registry())

    def meddle(read: Registry) -> Registry:
        # Another writer lands between every read and write of this one.
        update = load_registry(store, BUCKET, NAMESPACE, stack)
        save_registry(store, BUCKET, NAMESPACE, stack, update)
        return read

    with pytest.raises(RegistryConflict, match="changed by another writer"):
        update_registry(store, BUCKET, NAMESPACE, stack, meddle, attempts=3)
    assert load_registry(store, BUCKET, NAMESPACE, stack).revision == 4
    assert store.exists(BUCKET, registry_key(NAMESPACE, stack))
