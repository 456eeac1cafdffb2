"""`latentmas crd`, `latentmas operator run` and `latentmas trigger`: the Kubernetes-facing commands
(the CRD text, the operator process, and what the schedule's CronJob pod runs)."""

from __future__ import annotations

import argparse
import os
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    crd = subparsers.add_parser(
        "crd", help="print the LatentMASStack CRD (generated from the spec models)", description="Prints the CRD YAML."
    )
    crd.set_defaults(handler=_crd)

    operator = subparsers.add_parser("operator", help="run the Kubernetes operator")
    actions = operator.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="watch LatentMASStacks and run their evolution cycles",
        description="Runs the kopf operator until SIGTERM. In a pod it uses the in-cluster service account.",
    )
    run.add_argument("--namespace", "-n", action="append", default=[], help="watch only this namespace (repeatable)")
    run.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster or $KUBECONFIG)")
    run.add_argument("--workers", type=int, default=4, help="stacks reconciled in parallel")
    run.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0 disables)")
    run.add_argument("--health-port", type=int, default=8081, help="liveness /healthz port (0 disables)")
    run.add_argument("--poll-seconds", type=float, default=10.0, help="re-check a running cycle this often")
    run.add_argument("--resync-seconds", type=float, default=60.0, help="re-check an idle stack this often")
    run.add_argument("--manifest-grace-seconds", type=float, default=30.0, help="wait for a manifest after a Job")
    run.add_argument("--watch-server-timeout", type=int, default=300, help="API-side watch timeout (s)")
    run.add_argument("--watch-client-timeout", type=int, default=330, help="client-side watch timeout (s)")
    run.add_argument(
        "--trigger-image",
        default=os.environ.get("LATENTMAS_TRIGGER_IMAGE", "ghcr.io/latentmas/latentmas-operator:0.1.0"),
        help="image of the schedule CronJob's pod (runs `latentmas trigger`)",
    )
    run.add_argument(
        "--spark-driver-cluster-role",
        default="latentmas-spark-driver",
        help="static ClusterRole bound to a Spark-cleaning stack's jobs account (the chart installs it)",
    )
    run.add_argument("--leader-elect", action="store_true", help="run as one of several replicas (Lease)")
    run.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the leader Lease (default: $POD_NAMESPACE)",
    )
    run.add_argument("--leader-election-lease", default="latentmas-operator", help="name of the leader Lease")
    run.set_defaults(handler=_operator_run)

    trigger = subparsers.add_parser(
        "trigger",
        help="start an evolution cycle of a stack (annotates it with a new latentmas.io/evolve nonce)",
        description="Sets latentmas.io/evolve=<nonce>; the operator starts one cycle per new nonce.",
    )
    trigger.add_argument("stack", help="LatentMASStack name")
    trigger.add_argument("--namespace", "-n", default=os.environ.get("POD_NAMESPACE", "default"))
    trigger.add_argument("--nonce", default=None, help="unique value (default: the current time)")
    trigger.add_argument("--source", choices=("annotation", "schedule"), default="annotation")
    trigger.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster or $KUBECONFIG)")
    trigger.set_defaults(handler=_trigger)


def _crd(args: argparse.Namespace) -> int:
    from latentmas.crd import crd_yaml

    print(crd_yaml(), end="")
    return 0


def _kubeconfig_source(kubeconfig: str | None) -> str | None:
    """Where the credentials come from, as the error lines name it (`--kubeconfig FILE`, `$KUBECONFIG FILE`,
    `FILE`; None in a pod's service account). A kubeconfig that is not there fails here naming its path: the
    client says only: Invalid kube-config file. No configuration found."""
    if kubeconfig is not None:
        source, value = f"--kubeconfig {kubeconfig}", kubeconfig
    elif os.environ.get("KUBECONFIG"):
        source, value = f"$KUBECONFIG {os.environ['KUBECONFIG']}", os.environ["KUBECONFIG"]
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    else:
        source = value = "~/.kube/config"
    # Like the client: a list of files (os.pathsep), ~ expanded, missing ones skipped while one is there.
    if not any(os.path.isfile(os.path.expanduser(p)) for p in value.split(os.pathsep) if p):
        hint = " (pass --kubeconfig FILE or set $KUBECONFIG)" if source == "~/.kube/config" else ""
        raise FileNotFoundError(f"{source}: no such file{hint}")
    return source


def _operator_run(args: argparse.Namespace) -> int:
    credentials = _kubeconfig_source(args.kubeconfig)
    import asyncio
    import socket

    from kubernetes.config import ConfigException
    from latentmas.operator.handlers import RunOptions, run
    from latentmas.operator.plan import Settings

    settings = Settings(
        trigger_image=args.trigger_image,
        poll_seconds=args.poll_seconds,
        resync_seconds=args.resync_seconds,
        manifest_grace_seconds=args.manifest_grace_seconds,
        spark_driver_role=args.spark_driver_cluster_role,
    )
    options = RunOptions(
        namespaces=tuple(args.namespace),
        kubeconfig=args.kubeconfig,
        workers=args.workers,
        watch_server_timeout=args.watch_server_timeout,
        watch_client_timeout=args.watch_client_timeout,
        metrics_port=args.metrics_port or None,
        health_port=args.health_port or None,
        settings=settings,
        leader_election=args.leader_elect,
        lease_namespace=args.leader_election_namespace,
        lease_name=args.leader_election_lease,
        identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
    )
    try:
        asyncio.run(run(options))
    except ConfigException as err:
        raise ValueError(f"{credentials or 'in-cluster config'}: {err}") from None
    return 0


def _trigger(args: argparse.Namespace) -> int:
    credentials = _kubeconfig_source(args.kubeconfig)
    from kubernetes.client.rest import ApiException
    from kubernetes.config import ConfigException
    from latentmas.operator import kube, names

    nonce = args.nonce or str(time.time_ns())
    source = f"{args.source}:{nonce}"
    body = {"metadata": {"annotations": {names.ANNOTATION_EVOLVE: nonce, names.ANNOTATION_EVOLVE_SOURCE: source}}}
    try:
        api = kube.api_client(args.kubeconfig)
    except ConfigException as err:
        raise ValueError(f"{credentials or 'in-cluster config'}: {err}") from None
    try:
        kube.patch(api, "LatentMASStack", args.namespace, args.stack, body)
    except ApiException as err:
        raise RuntimeError(f"cannot annotate {args.namespace}/{args.stack}: {err.status} {err.reason}") from None
    print(f"{args.namespace}/{args.stack}: {names.ANNOTATION_EVOLVE}={nonce} ({args.source})")
    return 0
