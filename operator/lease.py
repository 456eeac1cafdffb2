"""Leader election over a coordination.k8s.io/v1 Lease, as client-go does it: one replica holds the Lease
and reconciles; the others wait until it stops renewing. Every write of the Lease carries the
resourceVersion read (optimistic concurrency), so two replicas never both believe they hold it. A
leader that cannot renew in time gives up (the process exits and is restarted as a standby), so two
operators never act side by side — no doubled events, no flapping phase."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from latentmas.operator import kube

log = logging.getLogger("latentmas.operator.lease")


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def expired(spec: dict[str, Any], now: datetime) -> bool:
    """Whether the holder's last renewal is older than its lease duration (or there is no holder)."""
    renewed = _parse(spec.get("renewTime"))
    duration = int(spec.get("leaseDurationSeconds") or 0)
    return not spec.get("holderIdentity") or renewed is None or renewed + timedelta(seconds=duration) < now


class LeaderLease:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        duration_seconds: int = 15,
        renew_seconds: float = 5.0,
    ) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.duration, self.renew = duration_seconds, renew_seconds
        self._url = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    def try_acquire(self) -> bool:
        """Takes or renews the Lease; False when another live holder has it or a concurrent write won."""
        now = _now()
        try:
            lease = kube.request(self.api, "GET", f"{self._url}/{self.name}")
        except ApiException as err:
            if err.status != 404:
                raise
            lease = None
        spec = dict((lease or {}).get("spec") or {})
        mine = spec.get("holderIdentity") == self.identity
        if lease is not None and not mine and not expired(spec, now):
            return False
        if not mine:
            spec["acquireTime"] = _stamp(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=self.duration, renewTime=_stamp(now))
        body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": spec}
        try:
            if lease is None:
                body["metadata"] = {"name": self.name, "namespace": self.namespace}
                kube.request(self.api, "POST", self._url, body)
            else:  # PUT with the resourceVersion read: a concurrent writer makes this fail with 409
                body["metadata"] = {**lease["metadata"]}
                kube.request(self.api, "PUT", f"{self._url}/{self.name}", body)
        except ApiException as err:
            if err.status in (409, 422):
                return False
            raise
        return True

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Blocks until this replica leads (True) or `stop` is set (False)."""
        log.info("waiting for leadership of Lease %s/%s as %s", self.namespace, self.name, self.identity)
        while not (stop is not None and stop.is_set()):
            try:
                if self.try_acquire():
                    log.info("leading as %s", self.identity)
                    return True
            except ApiException as err:
                log.warning("leader election: %s", err.reason)
            (stop or threading.Event()).wait(self.renew)
        return False

    def keep(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renews in the background; `on_lost` runs once when a renewal did not succeed within the lease."""

        def renew() -> None:
            last = _now()
            while True:
                threading.Event().wait(self.renew)
                try:
                    if self.try_acquire():
                        last = _now()
                        continue
                except ApiException as err:
                    log.warning("lease renewal failed: %s", err.reason)
                except Exception as err:  # the API server is unreachable: keep trying until the lease ends
                    log.warning("lease renewal failed: %s", err)
                if _now() - last > timedelta(seconds=self.duration):
                    log.error("lost leadership of Lease %s/%s", self.namespace, self.name)
                    on_lost()
                    return

        thread = threading.Thread(target=renew, name="latentmas-lease", daemon=True)
        thread.start()
        return thread
