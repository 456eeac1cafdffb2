"""Which registry reads the server applies: pure decisions over parsed reads (no storage needed)."""

from __future__ import annotations

import pytest
from latentmas.registry import ArtifactEntry, ArtifactVersion, Registry
from latentmas.services.hotreload import backoff
from latentmas.services.registry_read import Refusal, RegistryRead, judge
from latentmas.store import LocalStore

pytestmark = pytest.mark.serving


def _registry(revision: int, experts: tuple[str, ...] = ("finance",)) -> Registry:
    version = ArtifactVersion(version=1, prefix="p/", files={})
    return Registry(revision=revision, experts={name: ArtifactEntry(current=1, history=[version]) for name in experts})


def test_reads_that_would_unload_or_go_back_are_refused() -> None:
    served = _registry(5)
    cases = {
        "missing": RegistryRead(None, "missing"),
        "unparseable": RegistryRead(None, "unparseable", "Expecting value: line 1 column 1"),
        "empty": RegistryRead(Registry()),
        "older": RegistryRead(_registry(4, ("finance", "legal"))),
    }
    for reason, read in cases.items():
        verdict = judge(served, read)
        assert isinstance(verdict, Refusal) and verdict.reason == reason, reason
        assert "serving revision 5" in verdict.message or "served revision 5" in verdict.message
    emptied = judge(served, RegistryRead(Registry(revision=9)))  # a newer revision that holds nothing
    assert isinstance(emptied, Refusal) and emptied.reason == "empty"


def test_forward_and_same_revisions_apply_and_a_fresh_server_accepts_anything_readable() -> None:
    served = _registry(5)
    newer = _registry(6, ("legal",))  # a deliberate removal of finance, as a new revision
    assert judge(served, RegistryRead(newer)) is newer
    same = _registry(5)
    assert judge(served, RegistryRead(same)) is same  # a forced re-read of what is served
    assert judge(None, RegistryRead(None, "missing")) == Registry()  # a fresh stack: nothing to unload
    assert judge(None, RegistryRead(Registry())) == Registry()
    assert isinstance(judge(None, RegistryRead(None, "unparseable", "x")), Refusal)
    legacy = Registry.model_validate({"experts": {}})  # a registry.json from before the revision counter
    assert legacy.revision == 0 and judge(Registry(), RegistryRead(legacy)) is legacy


def test_read_distinguishes_missing_unparseable_and_invalid(tmp_path) -> None:
    from latentmas.services.registry_read import read_registry

    store = LocalStore(tmp_path)
    store.ensure_bucket("b")
    assert read_registry(store, "b", "r.json").problem == "missing"
    for raw in (b"{not json", b'{"experts": {"x": {"current": "one"}}}', b"[]"):
        store.put_bytes("b", "r.json", raw)
        read = read_registry(store, "b", "r.json")
        assert read.registry is None and read.problem == "unparseable" and read.detail, raw
    store.put_bytes("b", "r.json", b"{}")
    assert read_registry(store, "b", "r.json").registry == Registry()


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, 0.5, 4.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
