"""Operations on the promoted-artifact registry beyond promotion: rollback and a readable summary.

Each change is one conditional registry write (`update_registry`), so readers see the old or the new
pointer, never a mix, and a change racing another writer is re-applied to the newer registry."""

from __future__ import annotations

from typing import Any, Literal

from latentmas.registry import ArtifactEntry, Registry, update_registry
from latentmas.store import ObjectStore

Kind = Literal["expert", "router", "index", "base"]


def entry_of(registry: Registry, kind: Kind, name: str) -> ArtifactEntry:
    """The registry entry an operation targets; an expert must exist by name."""
    if kind == "expert":
        if name not in registry.experts:
            known = ", ".join(sorted(registry.experts)) or "none"
            raise ValueError(f"expert {name!r} is not in the registry (known: {known})")
        return registry.experts[name]
    entry: ArtifactEntry = getattr(registry, kind)
    return entry


def previous_version(entry: ArtifactEntry) -> int:
    """The newest version older than the current one: what a rollback switches to."""
    if entry.current is None:
        raise ValueError("nothing is promoted, so there is nothing to roll back")
    older = [v.version for v in entry.history if v.version < entry.current]
    if not older:
        raise ValueError(f"version {entry.current} is the oldest; there is no previous version")
    return max(older)


def rolled_back(registry: Registry, kind: Kind, name: str) -> Registry:
    """A copy of `registry` whose `kind`/`name` entry points at its previous version (history kept)."""
    updated = registry.model_copy(deep=True)
    entry = entry_of(updated, kind, name)
    entry.current = previous_version(entry)
    return updated


def rollback(store: ObjectStore, bucket: str, namespace: str, stack: str, name: str, kind: Kind = "expert") -> Registry:
    """Restores the previous promoted version of an artifact with one registry write."""
    return update_registry(store, bucket, namespace, stack, lambda registry: rolled_back(registry, kind, name))


def summary(registry: Registry) -> dict[str, Any]:
    """A compact view for people: current version, available versions and key metrics per artifact."""

    def view(entry: ArtifactEntry) -> dict[str, Any]:
        active = entry.active()
        return {
            "current": entry.current,
            "versions": [v.version for v in entry.history],
            "cycle": active.cycle if active else None,
            "prefix": active.prefix if active else None,
            "metrics": active.metrics if active else {},
        }

    return {
        "revision": registry.revision,
        "updatedAt": registry.updated_at,
        "base": view(registry.base),
        "router": view(registry.router),
        "index": view(registry.index),
        "experts": {name: view(entry) for name, entry in sorted(registry.experts.items())},
        "rejected": registry.rejected[-10:],
    }
