"""Hot reload: follow registry.json and bring newly promoted versions into the running server.

A change is noticed by MinIO bucket notifications (`listen_bucket_notification` on the registry key)
and, as a fallback for stores without notifications and for missed events, by polling the registry's
ETag. Each new version is downloaded into a temp folder, every file checked against its sha256, loaded
(shapes and finite values checked) into a free slot, and only then switched to. A failure keeps the old
version serving and is reported per artifact; a registry read that may not be applied (see
registry_read) keeps the whole served revision and is reported as `registry_error`. Storage outages
are retried with exponential backoff and logged once per distinct error."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentmas.names import RESERVED_EXPERT_NAMES
from latentmas.registry import ArtifactEntry, ArtifactVersion, Registry, load_registry, registry_key
from latentmas.services.registry_read import Refusal, RegistryRead, judge, read_registry
from latentmas.store import ObjectNotFound, ObjectStore, S3Store, StoreError, sha256_file

log = logging.getLogger("latentmas.services.hotreload")


class ArtifactCorrupt(ValueError):
    """A downloaded file whose sha256 differs from the registry's."""


class RegistryUnavailable(StoreError):
    """The registry could not be read at all (storage outage); nothing served changed."""


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

    def read(self) -> RegistryRead:
        return read_registry(self.store, self.bucket, self.key)

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
    refused: Refusal | None = None


def reserved_key(name: str) -> str:
    """`errors` key of an expert whose name is reserved (never its bare name: that may be 'router')."""
    return f"experts/{name}"


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
    on_refused: Callable[[str], None] | None = None
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    registry_error: dict[str, Any] | None = None
    registry: Registry | None = None
    last_etag: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _version(self, entry: ArtifactEntry) -> ArtifactVersion | None:
        return entry.active()

    def check(self, force: bool = False) -> ReloadReport:
        """Loads registry.json and applies what changed; a version that failed once is retried only when
        forced (POST /adapters/reload) or when the registry points elsewhere. A read `judge` refuses
        changes nothing and is reported; a storage outage raises RegistryUnavailable."""
        with self._lock:
            try:
                etag = self.source.etag()
                if not force and etag is not None and etag == self.last_etag:
                    return ReloadReport(self.registry.revision if self.registry else 0)
                verdict = judge(self.registry, self.source.read())
            except StoreError as err:
                self._refuse(Refusal("storage", f"registry unreadable: {err}"))
                raise RegistryUnavailable(str(err)) from err
            if isinstance(verdict, Refusal):
                self._refuse(verdict)
                self.last_etag = etag  # the same bad file is not re-read every poll; a new write is
                return ReloadReport(self.registry.revision if self.registry else 0, refused=verdict)
            registry = verdict
            if self.registry_error is not None:
                log.info("registry revision %d accepted; %s cleared", registry.revision, self.registry_error["reason"])
            self.registry_error = None
            report = ReloadReport(registry.revision)
            if self.apply_base is not None and self.apply_base(registry):
                report.changed["base"] = registry.base.current or 0
            active = self.active()
            for name, entry in registry.experts.items():
                target = self._version(entry)
                if name in RESERVED_EXPERT_NAMES:
                    self._reserved(name, target, report)
                    continue
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
            known = {"router", *registry.experts, *(reserved_key(n) for n in registry.experts)}
            for stale in set(self.errors) - known:
                del self.errors[stale]
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

    def pin(self, name: str, version: ArtifactVersion) -> None:
        """Applies one expert version by hand (load or rollback) under the same lock as registry checks, so a
        manual pin never interleaves with a reload of the same expert."""
        with self._lock:
            self.apply_expert(name, version)
            self.errors.pop(name, None)

    def _reserved(self, name: str, target: ArtifactVersion | None, report: ReloadReport) -> None:
        message = f"expert name {name!r} is reserved ({', '.join(sorted(RESERVED_EXPERT_NAMES))}); not served"
        if reserved_key(name) not in self.errors:
            log.warning("registry: %s", message)
        version = target.version if target else None
        self.errors[reserved_key(name)] = {"version": version, "error": message, "at": time.time()}
        report.errors[reserved_key(name)] = message

    def _refuse(self, refusal: Refusal) -> None:
        """Records a refused read and logs a refused registry file once (until it changes); storage
        outages are logged by the Watcher, with backoff."""
        previous = self.registry_error or {}
        if refusal.reason != "storage" and previous.get("error") != refusal.message:
            log.warning("registry read refused, still serving the last good revision: %s", refusal.message)
        self.registry_error = {"reason": refusal.reason, "error": refusal.message, "at": time.time()}
        if self.on_refused is not None:
            self.on_refused(refusal.reason)


def is_power_of_two(n: int) -> bool:
    """Failures logged at warning level: the 1st, 2nd, 4th, 8th, ... (a day-long outage logs ~17 lines)."""
    return n > 0 and n & (n - 1) == 0


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after `failures` consecutive failed checks: base, then doubling up to `cap`."""
    return min(cap, base * 2 ** max(0, failures)) if failures else base


class Watcher:
    """Runs `reloader.check()` on bucket notifications and every `poll_seconds` (ETag comparison).

    `notifications` is true only while a listen request is established (response received). After a
    failed check the poller waits longer (exponential backoff up to `max_backoff`); `on_error` gets each
    failure; the log shows failures 1, 2, 4, 8, ... at warning level (the rest at debug) and the recovery."""

    def __init__(
        self,
        reloader: Reloader,
        poll_seconds: float,
        on_error: Callable[[str], None],
        listen: bool = True,
        max_backoff: float = 60.0,
    ) -> None:
        self.reloader = reloader
        self.poll_seconds = poll_seconds
        self.max_backoff = max(max_backoff, poll_seconds)
        self.on_error = on_error
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.notifications = False
        self.failures = 0
        self.checks = 0
        self.listen_attempts = 0
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
            self._kick.wait(timeout=backoff(self.failures, self.poll_seconds, self.max_backoff))
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self.reloader.check()
            except Exception as err:  # the watcher must outlive any bad registry or store outage
                self.failures += 1
                message = f"{type(err).__name__}: {err}"
                level = logging.WARNING if is_power_of_two(self.failures) else logging.DEBUG
                log.log(level, "registry check failed %d time(s), retrying with backoff: %s", self.failures, message)
                self.on_error(message)
            else:
                if self.failures:
                    log.warning("registry reachable again after %d failed checks", self.failures)
                self.failures = 0
            finally:
                self.checks += 1

    def _listen(self) -> None:
        """Bucket notifications; reconnects with backoff after errors (logged at debug: the poller covers
        the gaps and reports outages)."""
        source = self.reloader.source
        assert isinstance(source.store, S3Store)
        failures = 0
        while not self._stop.is_set():
            try:
                events = source.store.client.listen_bucket_notification(
                    source.bucket, prefix=source.key, events=("s3:ObjectCreated:*",)
                )
                connect = events._func  # minio opens the request lazily, on the first next()

                def established(connect: Callable[[], Any] = connect) -> Any:
                    self.listen_attempts += 1
                    response = connect()
                    self.notifications = True
                    return response

                events._func = established
                with events:
                    for _ in events:
                        failures = 0
                        self._kick.set()
                        if self._stop.is_set():
                            return
            except Exception as err:
                self.notifications = False
                failures += 1
                log.debug("bucket notifications unavailable (attempt %d): %s", failures, err)
                self._stop.wait(backoff(failures, self.poll_seconds, self.max_backoff))
