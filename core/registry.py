"""The artifact registry: `<artifacts>/<namespace>/<stack>/registry.json`, the single pointer to the
promoted versions of every expert adapter, the router and the RAG index.

Promotion uploads versioned artifacts first (under `registry/<kind>/<name>/v<N>/`, each file with its
sha256), then replaces registry.json in one write, so readers never see half a version. History is
kept so a version can be rolled back.

Every write is conditional on the registry that was read (its ETag; `If-None-Match: *` when there
was none), so two writers racing (two promotions, a promotion and a rollback) cannot silently lose
one: the later write fails with `RegistryConflict`, and `update_registry` re-reads and re-applies
its change. A version number is claimed (a conditional create of `v<N>/_claim`) before its files
are uploaded, so two writers never upload into the same version folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from latentmas.store import ObjectNotFound, ObjectStore, PreconditionFailed
from pydantic import BaseModel, Field, PrivateAttr

REGISTRY_FILE = "registry.json"
CLAIM_FILE = "_claim"
UPDATE_ATTEMPTS = 8


class RegistryConflict(RuntimeError):
    """registry.json changed between this writer's read and its write."""


class ArtifactVersion(BaseModel):
    version: int = Field(ge=1)
    prefix: str = Field(description="Key prefix of this version's files in the artifacts bucket.")
    files: dict[str, str] = Field(description="File name -> sha256.")
    cycle: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    promoted_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


class ArtifactEntry(BaseModel):
    """One promoted artifact (an expert, the router, the index, the base) and its history."""

    current: int | None = None
    history: list[ArtifactVersion] = Field(default_factory=list)

    def active(self) -> ArtifactVersion | None:
        return next((v for v in self.history if v.version == self.current), None)

    def next_version(self) -> int:
        return max((v.version for v in self.history), default=0) + 1


class Registry(BaseModel):
    revision: int = 0
    updated_at: str = ""
    base: ArtifactEntry = Field(default_factory=ArtifactEntry)
    router: ArtifactEntry = Field(default_factory=ArtifactEntry)
    index: ArtifactEntry = Field(default_factory=ArtifactEntry)
    experts: dict[str, ArtifactEntry] = Field(default_factory=dict)
    rejected: list[dict[str, Any]] = Field(
        default_factory=list, description="Candidates the evaluation gate refused, with the reason."
    )
    # The ETag of the registry.json this object was read from (None: there was none); copies keep it.
    _etag: str | None = PrivateAttr(default=None)


def registry_key(namespace: str, stack: str) -> str:
    return f"{namespace}/{stack}/{REGISTRY_FILE}"


def version_prefix(namespace: str, stack: str, kind: str, name: str, version: int) -> str:
    return f"{namespace}/{stack}/registry/{kind}/{name}/v{version}/"


def load_registry(store: ObjectStore, bucket: str, namespace: str, stack: str) -> Registry:
    """The current registry (empty when none was written yet), remembering the ETag it was read at."""
    try:
        raw, etag = store.get_with_etag(bucket, registry_key(namespace, stack))
    except ObjectNotFound:
        return Registry()
    registry = Registry.model_validate(json.loads(raw))
    registry._etag = etag
    return registry


def save_registry(store: ObjectStore, bucket: str, namespace: str, stack: str, registry: Registry) -> Registry:
    """Replaces registry.json in one write, bumping its revision, only if it is still the one that
    `registry` was read from; otherwise `RegistryConflict` (nothing is written)."""
    updated = registry.model_copy(
        update={"revision": registry.revision + 1, "updated_at": datetime.now(UTC).isoformat()}
    )
    key = registry_key(namespace, stack)
    try:
        etag = store.put_bytes_if(bucket, key, updated.model_dump_json(indent=2).encode(), registry._etag)
    except PreconditionFailed as err:
        raise RegistryConflict(
            f"{bucket}/{key}: changed by another writer since revision {registry.revision} was read"
        ) from err
    updated._etag = etag
    return updated


def update_registry(
    store: ObjectStore,
    bucket: str,
    namespace: str,
    stack: str,
    change: Callable[[Registry], Registry],
    attempts: int = UPDATE_ATTEMPTS,
) -> Registry:
    """Read, `change`, conditional write; on a conflict the change is re-applied to a fresh read.
    `change` must work from its argument alone (it may run more than once)."""
    where = (store, bucket, namespace, stack)
    for attempt in range(1, attempts + 1):
        try:
            return save_registry(*where, change(load_registry(*where)))
        except RegistryConflict:
            if attempt == attempts:
                raise
    raise ValueError(f"update_registry: attempts must be at least 1, got {attempts}")


def claim_version(
    store: ObjectStore, bucket: str, namespace: str, stack: str, kind: str, name: str, first: int, owner: str
) -> int:
    """The first version number from `first` on that is unclaimed or already claimed by `owner` (a
    writer retrying after a conflict, or re-running, reuses its own claim); claimed for `owner` now."""
    version = first
    while True:
        key = version_prefix(namespace, stack, kind, name, version) + CLAIM_FILE
        try:
            store.put_bytes_if(bucket, key, owner.encode(), None)
            return version
        except PreconditionFailed:
            if store.get_bytes(bucket, key) == owner.encode():
                return version
            version += 1
