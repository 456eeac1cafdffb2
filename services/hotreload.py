"""Hot reload: follow registry.json and bring newly promoted versions into the running server.

A change is noticed by MinIO bucket notifications (`listen_bucket_notification` on the registry key)
and, as a fallback for stores without notifications and for missed events, by polling the registry's
ETag. Each new version is downloaded into a temp folder, every file checked against its sha256, loaded
(shapes checked against the base) into a free slot, and only then switched to. A failure keeps the old
version serving and is reported per artifact."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentmas.registry import ArtifactEntry, ArtifactVersion, Registry, load_registry, registry_key
from latentmas.store import ObjectNotFound, ObjectStore, S3Store, sha256_file

log = logging.getLogger("latentmas.services.hotreload")


class ArtifactCorrupt(ValueError):
    """A downloaded file whose sha256 differs from the registry's."""


@dataclass
class RegistrySource:
    """Where the registry and its artifacts live, plus a local download folder (the disk tier)."""

    store: ObjectStore
    bucket: str
    namespace: str
    stack: str
    cache_dir: Path

    @property
    def key(self) -> str:
        return registry_key(self.namespace, self.stack)

    def etag(self) -> str | None:
        try:
            return self.store.stat(self.bucket, self.key).etag
        except ObjectNotFound:
            return None

    def registry(self) -> Registry:
        return load_registry(self.store, self.bucket, self.namespace, self.stack)

    def download(self, kind: str, name: str, version: ArtifactVersion) -> Path:
        """Fetches every file of a version and checks its sha256; the folder appears only when complete."""
        target = self.cache_dir / kind / name / f"v{version.version}"
        if target.is_dir():
            return target
        staging = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for file_name, digest in version.files.items():
                path = staging / file_name
                self.store.get_file(self.bucket, version.prefix + file_name, path)
                actual = sha256_file(path)
                if actual != digest:
                    raise ArtifactCorrupt(
                        f"{kind} {name} v{version.version}: {file_name} sha256 {actual[:12]} != registry {digest[:12]}"
                    )
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


@dataclass
class ReloadReport:
    revision: int
    changed: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Reloader:
    """Applies the registry to the server through the server's loaders, which raise to refuse a version. A new
    base is applied first (`apply_base` loads it with its experts and router, then switches)."""

    source: RegistrySource
    apply_expert: Callable[[str, ArtifactVersion], None]
    remove_expert: Callable[[str], None]
    apply_router: Callable[[Path, int], None]
    active: Callable[[], dict[str, int]]
    apply_base: Callable[[Registry], bool] | None = None
    on_change: list[Callable[[Registry], None]] = field(default_factory=list)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    registry: Registry | None = None
    last_etag: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _version(self, entry: ArtifactEntry) -> ArtifactVersion | None:
        return entry.active()

    def check(self, force: bool = False) -> ReloadReport:
        """Loads registry.json and applies what changed; a version that failed once is retried only when
        forced (POST /adapters/reload) or when the registry points elsewhere."""
        with self._lock:
            etag = self.source.etag()
            if not force and etag is not None and etag == self.last_etag:
                return ReloadReport(self.registry.revision if self.registry else 0)
            registry = self.source.registry()
            report = ReloadReport(registry.revision)
            if self.apply_base is not None and self.apply_base(registry):
                report.changed["base"] = registry.base.current or 0
            active = self.active()
            for name, entry in registry.experts.items():
                target = self._version(entry)
                if target is None or active.get(name) == target.version:
                    self.errors.pop(name, None)
                    continue
                failed = self.errors.get(name)
                if failed and failed["version"] == target.version and not force:
                    continue
                try:
                    self.apply_expert(name, target)
                except Exception as err:
                    log.warning("expert %s v%d rejected: %s", name, target.version, err)
                    self.errors[name] = {"version": target.version, "error": str(err), "at": time.time()}
                    report.errors[name] = str(err)
                else:
                    self.errors.pop(name, None)
                    report.changed[name] = target.version
            for name in set(active) - {n for n, e in registry.experts.items() if e.current is not None}:
                self.remove_expert(name)
                report.changed[name] = 0
            router = self._version(registry.router)
            previous_router = self.registry.router.current if self.registry else None
            if router is not None and (router.version != previous_router or force or "router" in self.errors):
                try:
                    self.apply_router(self.source.download("router", "router", router), router.version)
                    self.errors.pop("router", None)
                    report.changed["router"] = router.version
                except Exception as err:
                    self.errors["router"] = {"version": router.version, "error": str(err), "at": time.time()}
                    report.errors["router"] = str(err)
            self.registry, self.last_etag = registry, etag
        for callback in self.on_change:
            callback(registry)
        return report


class Watcher:
    """Runs `reloader.check()` on bucket notifications and every `poll_seconds` (ETag comparison)."""

    def __init__(
        self, reloader: Reloader, poll_seconds: float, on_error: Callable[[str], None], listen: bool = True
    ) -> None:
        self.reloader = reloader
        self.poll_seconds = poll_seconds
        self.on_error = on_error
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.notifications = False
        self._threads = [threading.Thread(target=self._poll, name="latentmas-reload", daemon=True)]
        if listen and isinstance(reloader.source.store, S3Store):
            self._threads.append(threading.Thread(target=self._listen, name="latentmas-notify", daemon=True))

    def start(self) -> Watcher:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        for thread in self._threads[:1]:
            thread.join(timeout=10)

    def kick(self) -> None:
        self._kick.set()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(timeout=self.poll_seconds)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self.reloader.check()
            except Exception as err:  # the watcher must outlive any bad registry or store outage
                self.on_error(f"{type(err).__name__}: {err}")

    def _listen(self) -> None:
        """Bucket notifications; reconnects after errors, the poller covers the gaps."""
        source = self.reloader.source
        assert isinstance(source.store, S3Store)
        while not self._stop.is_set():
            try:
                with source.store.client.listen_bucket_notification(
                    source.bucket, prefix=source.key, events=("s3:ObjectCreated:*",)
                ) as events:
                    self.notifications = True
                    for _ in events:
                        self._kick.set()
                        if self._stop.is_set():
                            return
            except Exception as err:
                self.notifications = False
                log.debug("bucket notifications unavailable: %s", err)
                self._stop.wait(self.poll_seconds)
