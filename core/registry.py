"""The artifact registry: `<artifacts>/<namespace>/<stack>/registry.json`, the single pointer to the
promoted versions of every expert adapter, the router and the RAG index.

Promotion uploads versioned artifacts first (under `registry/<kind>/<name>/v<N>/`, each file with its
sha256), then replaces registry.json in one write, so readers never see half a version. History is
kept so a version can be rolled back."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from latentmas.store import ObjectNotFound, ObjectStore
from pydantic import BaseModel, Field

REGISTRY_FILE = "registry.json"


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


def registry_key(namespace: str, stack: str) -> str:
    return f"{namespace}/{stack}/{REGISTRY_FILE}"


def version_prefix(namespace: str, stack: str, kind: str, name: str, version: int) -> str:
    return f"{namespace}/{stack}/registry/{kind}/{name}/v{version}/"


def load_registry(store: ObjectStore, bucket: str, namespace: str, stack: str) -> Registry:
    try:
        raw = store.get_bytes(bucket, registry_key(namespace, stack))
    except ObjectNotFound:
        return Registry()
    return Registry.model_validate(json.loads(raw))


def save_registry(store: ObjectStore, bucket: str, namespace: str, stack: str, registry: Registry) -> Registry:
    """Replaces registry.json in one write, bumping its revision."""
    updated = registry.model_copy(
        update={"revision": registry.revision + 1, "updated_at": datetime.now(UTC).isoformat()}
    )
    store.put_bytes(bucket, registry_key(namespace, stack), updated.model_dump_json(indent=2).encode())
    return updated
