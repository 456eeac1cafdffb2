"""Which registry reads the server may act on.

A registry read that is missing, holds nothing, cannot be parsed, or is older than the revision being
served never replaces it: applying such a read would unload every expert (a `{}` file parses as an
empty registry). The server keeps serving the last good revision and reports why the read was
refused. Revisions only move forward; a deliberate rollback is promoted as a new revision. A
registry.json written before the revision counter existed reads as revision 0."""

from __future__ import annotations

import json
from dataclasses import dataclass

from latentmas.registry import Registry
from latentmas.store import ObjectNotFound, ObjectStore
from pydantic import ValidationError


@dataclass(frozen=True)
class RegistryRead:
    """One read of registry.json: the parsed registry, or why there is none ('missing' / 'unparseable')."""

    registry: Registry | None
    problem: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Refusal:
    """Why a read is not applied: `reason` is a metric label, `message` one line for people."""

    reason: str
    message: str


def read_registry(store: ObjectStore, bucket: str, key: str) -> RegistryRead:
    """Reads and parses registry.json; storage errors (an outage) propagate to the caller."""
    try:
        raw = store.get_bytes(bucket, key)
    except ObjectNotFound:
        return RegistryRead(None, "missing")
    try:
        return RegistryRead(Registry.model_validate(json.loads(raw)))
    except (ValueError, ValidationError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return RegistryRead(None, "unparseable", first)


def holds_artifacts(registry: Registry) -> bool:
    """Whether the registry points at any artifact at all."""
    entries = [registry.base, registry.router, registry.index, *registry.experts.values()]
    return any(entry.current is not None for entry in entries)


def judge(served: Registry | None, read: RegistryRead) -> Registry | Refusal:
    """The registry to apply, or why `read` must not replace `served` (what the server runs now)."""
    serving = served is not None and holds_artifacts(served)
    at = f"; serving revision {served.revision}" if served is not None else ""
    if read.problem == "unparseable":
        return Refusal("unparseable", f"registry.json is not a valid registry ({read.detail}){at}")
    if read.registry is None:
        if serving:
            return Refusal("missing", f"registry.json is missing{at}")
        return Registry()
    registry = read.registry
    if serving and not holds_artifacts(registry):
        return Refusal("empty", f"registry.json (revision {registry.revision}) holds no artifacts{at}")
    if served is not None and registry.revision < served.revision:
        return Refusal(
            "older", f"registry.json revision {registry.revision} is older than the served revision {served.revision}"
        )
    return registry
