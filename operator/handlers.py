"""The kopf side of the operator, deliberately thin: every watch event of a stack or of any object it
owns (Jobs, CronJob, Deployment, PodDisruptionBudget, HPA, inference pods, Services, ServiceAccounts,
ConfigMaps, Roles, RoleBindings, SparkApplications) only wakes that stack's reconcile in the work queue. No kopf
finalizers or progress annotations are used (deleting a stack never waits for us)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client
from latentmas.operator import names
from latentmas.operator.kube import api_client
from latentmas.operator.lease import LeaderLease
from latentmas.operator.plan import Settings
from latentmas.operator.reconciler import Reconciler
from latentmas.operator.stagejobs import SPARK_APP_GROUP, SPARK_APP_PLURAL, SPARK_APP_VERSION
from latentmas.operator.workqueue import Key, WorkQueue
from latentmas.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("latentmas.operator")


@dataclass(frozen=True)
class RunOptions:
    namespaces: Collection[str] = ()
    kubeconfig: str | None = None
    workers: int = 4
    watch_server_timeout: int = 300
    watch_client_timeout: int = 330
    metrics_port: int | None = 8080
    health_port: int | None = 8081
    settings: Settings = field(default_factory=Settings)
    leader_election: bool = False
    lease_namespace: str = "default"
    lease_name: str = "latentmas-operator"
    identity: str = ""


def build_registry(options: RunOptions) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(api_client(options.kubeconfig), options.settings)
    state: dict[str, WorkQueue] = {}

    def queue() -> WorkQueue:
        return state["queue"]

    async def work(key: Key) -> float | None:
        return await asyncio.to_thread(reconciler.reconcile, *key)

    def wake(namespace: str | None, stack: str | None) -> None:
        if namespace and stack and "queue" in state:
            queue().add((namespace, stack))

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(reconciler.api)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.server_timeout = options.watch_server_timeout
        settings.watching.client_timeout = options.watch_client_timeout
        settings.watching.connect_timeout = 30
        settings.networking.request_timeout = 60
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.level = logging.WARNING
        state["queue"] = WorkQueue(work, options.workers)
        state["queue"].start()
        loop = asyncio.get_running_loop()

        # A storage call that outlived its reconcile's wait wakes the stack again (from its own thread).
        def wake_from_thread(key: Key) -> None:
            loop.call_soon_threadsafe(queue().add, key)

        reconciler.wake_on_storage(wake_from_thread)
        if options.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(options.metrics_port)
        log.info("latentmas operator started (workers=%d)", options.workers)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if "queue" in state:
            await queue().stop()
        reconciler.shutdown()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def stack_event(type: str | None, namespace: str | None, name: str | None, **_: Any) -> None:
        if type == "DELETED":
            if namespace and name and "queue" in state:
                queue().forget((namespace, name))
                reconciler.phases.pop((namespace, name), None)
            return
        wake(namespace, name)

    selector: dict[str, Any] = {
        names.MANAGED_BY: names.OPERATOR_NAME,
        names.LABEL_STACK: kopf.PRESENT,
    }
    inference = {**selector, names.COMPONENT: "inference"}

    # Every owned kind is watched: a deleted, edited or scaled child wakes its stack, which re-applies it.
    @kopf.on.event("batch", "v1", "jobs", labels=selector, registry=registry)
    @kopf.on.event("batch", "v1", "cronjobs", labels=selector, registry=registry)
    @kopf.on.event("apps", "v1", "deployments", labels=selector, registry=registry)
    @kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=selector, registry=registry)
    @kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=selector, registry=registry)
    @kopf.on.event("", "v1", "services", labels=selector, registry=registry)
    @kopf.on.event("", "v1", "serviceaccounts", labels=selector, registry=registry)
    @kopf.on.event("", "v1", "configmaps", labels=selector, registry=registry)
    @kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=selector, registry=registry)
    @kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=selector, registry=registry)
    @kopf.on.event("", "v1", "pods", labels=inference, registry=registry)
    @kopf.on.event(SPARK_APP_GROUP, SPARK_APP_VERSION, SPARK_APP_PLURAL, labels=selector, registry=registry)
    async def child_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        wake(namespace, labels.get(names.LABEL_STACK))

    return registry


def connection_info(api: client.ApiClient) -> kopf.ConnectionInfo:
    """kopf logs in with the same credentials as the reconciler's client (in-cluster or --kubeconfig)."""
    cfg = api.configuration
    if cfg.refresh_api_key_hook is not None:
        cfg.refresh_api_key_hook(cfg)
    keys = cfg.api_key or {}
    raw = keys.get("BearerToken") or keys.get("authorization") or ""
    token = raw.removeprefix("Bearer ").strip() or None
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        username=cfg.username or None,
        password=cfg.password or None,
    )


async def lead(options: RunOptions) -> None:
    """Waits for the leader Lease (a standby answers its liveness probe meanwhile); once leading, renews
    in the background and exits the process if leadership is lost (it restarts as a standby)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Alive(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"standby")

        def log_message(self, *_: Any) -> None:
            pass

    lease = LeaderLease(api_client(options.kubeconfig), options.lease_namespace, options.lease_name, options.identity)
    health = ThreadingHTTPServer(("0.0.0.0", options.health_port), Alive) if options.health_port else None
    if health is not None:
        threading.Thread(target=health.serve_forever, daemon=True).start()
    try:
        await asyncio.to_thread(lease.acquire)
    finally:
        if health is not None:
            health.shutdown()
            health.server_close()
    lease.keep(lambda: os._exit(1))


async def run(
    options: RunOptions, stop_flag: asyncio.Event | None = None, ready_flag: asyncio.Event | None = None
) -> None:
    """Runs the operator until stopped (SIGTERM/SIGINT, or `stop_flag`)."""
    if options.leader_election:
        await lead(options)
    registry = build_registry(options)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # kopf logs every handled watch event at INFO; with many stacks that is most of the operator's work.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    liveness = f"http://0.0.0.0:{options.health_port}/healthz" if options.health_port else None
    await kopf.operator(
        registry=registry,
        clusterwide=not options.namespaces,
        namespaces=list(options.namespaces),
        standalone=True,
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
