"""A real Kubernetes control plane for tests: etcd + kube-apiserver, optionally a whole cluster
(controller-manager, scheduler and kwok fake nodes) so Jobs, Deployments and CronJobs really run."""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from latentmas.testing.binaries import binary, testbin_dir
from latentmas.testing.procs import ServerProcess, eventually, free_port

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Pods carrying this annotation are not completed by kwok: a test plays kubelet for them instead
# (runs the container's command for real, then sets the Pod's phase).
MANUAL_COMPLETION_ANNOTATION = "kwok.latentmas.io/manual-completion"


def kwok_stages(path: Path) -> Path:
    """kwok's own fast stages, with pod-complete skipping pods that ask for manual completion."""
    stages = [doc for doc in yaml.safe_load_all((testbin_dir() / "kwok-stages.yaml").read_text()) if doc]
    for stage in stages:
        if stage["metadata"]["name"] == "pod-complete":
            stage["spec"]["selector"]["matchExpressions"].append(
                {"key": f'.metadata.annotations["{MANUAL_COMPLETION_ANNOTATION}"]', "operator": "DoesNotExist"}
            )
    path.write_text(yaml.safe_dump_all(stages))
    return path


def _insecure_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _get_ok(url: str, token: str | None = None) -> bool:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=2, context=_insecure_tls()) as response:
        return int(response.status) == 200


def write_kubeconfig(path: Path, server: str, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin", "namespace": "default"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))


@dataclass
class ControlPlane:
    """etcd + kube-apiserver with RBAC, an admin token in system:masters and a kubeconfig file."""

    workdir: Path
    server: str = ""
    token: str = ""
    kubeconfig: Path = field(default_factory=Path)
    processes: list[ServerProcess] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def start(self) -> ControlPlane:
        self.workdir.mkdir(parents=True, exist_ok=True)
        etcd_client, etcd_peer = free_port(), free_port()
        etcd = ServerProcess(
            "etcd",
            [
                binary("etcd"),
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_client}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_client}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
            self.log_dir,
        )
        self.processes.append(etcd)
        etcd.wait_until(lambda: _get_ok(f"http://127.0.0.1:{etcd_client}/health"), 60, "healthy etcd")

        self.token = secrets.token_hex(16)
        (self.workdir / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        sa_key = self.workdir / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        apiserver = ServerProcess(
            "kube-apiserver",
            [
                binary("kube-apiserver"),
                "--etcd-servers",
                f"http://127.0.0.1:{etcd_client}",
                "--cert-dir",
                str(self.workdir / "certs"),
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                str(port),
                "--service-cluster-ip-range",
                "10.0.0.0/24",
                "--authorization-mode",
                "RBAC",
                "--token-auth-file",
                str(self.workdir / "tokens.csv"),
                "--service-account-issuer",
                "https://kubernetes.default.svc",
                "--service-account-key-file",
                str(sa_key),
                "--service-account-signing-key-file",
                str(sa_key),
                "--disable-admission-plugins",
                "ServiceAccount",
                "--allow-privileged",
            ],
            self.log_dir,
        )
        self.processes.append(apiserver)
        apiserver.wait_until(lambda: _get_ok(f"{self.server}/readyz", self.token), 120, "ready kube-apiserver")
        self.kubeconfig = self.workdir / "kubeconfig"
        write_kubeconfig(self.kubeconfig, self.server, self.token)
        return self

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        """Runs the real kubectl against this control plane and returns its stdout."""
        done = subprocess.run(
            [binary("kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def install_crd(self, manifest: str) -> None:
        """Applies a CustomResourceDefinition (YAML or JSON text) and waits until kubectl can use it:
        Established, then the resource in the API server's discovery, which lags Established a moment
        (a `kubectl apply` of an object in between fails with 'no matches for kind')."""
        crd = yaml.safe_load(manifest)
        name, group = crd["metadata"]["name"], crd["spec"]["group"]
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input_text=manifest)

        def established() -> bool:
            status = json.loads(self.kubectl("get", f"crd/{name}", "-o", "json")).get("status") or {}
            return any(c["type"] == "Established" and c["status"] == "True" for c in status.get("conditions") or [])

        eventually(established, 60, f"an Established CRD {name}")
        eventually(lambda: name in self.kubectl("api-resources", f"--api-group={group}", "-o", "name"), 60, name)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@dataclass
class Cluster:
    """A control plane plus kube-controller-manager, kube-scheduler and kwok managing fake nodes."""

    control_plane: ControlPlane
    node_names: tuple[str, ...] = ("kwok-node-0",)
    processes: list[ServerProcess] = field(default_factory=list)

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return self.control_plane.kubectl(*args, input_text=input_text, check=check)

    def start(self) -> Cluster:
        cp = self.control_plane
        kubeconfig = str(cp.kubeconfig)

        def controller_args() -> list[str]:
            """Flags the controller-manager and scheduler share: the control plane's kubeconfig for the API
            and delegated auth, no leader election, a loopback secure port of their own."""
            return [
                "--kubeconfig",
                kubeconfig,
                "--authentication-kubeconfig",
                kubeconfig,
                "--authorization-kubeconfig",
                kubeconfig,
                "--leader-elect=false",
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(free_port()),
            ]

        manager = ServerProcess(
            "kube-controller-manager",
            [
                binary("kube-controller-manager"),
                *controller_args(),
                "--service-account-private-key-file",
                str(cp.workdir / "sa.key"),
                "--cluster-cidr",
                "10.1.0.0/16",
                "--concurrent-job-syncs",
                "10",
                "--concurrent-cron-job-syncs",
                "5",
            ],
            cp.log_dir,
        )
        scheduler = ServerProcess(
            "kube-scheduler",
            [binary("kube-scheduler"), *controller_args()],
            cp.log_dir,
        )
        kwok = ServerProcess(
            "kwok",
            [
                binary("kwok"),
                # kwok reads --config in a first pass that stops at the first flag it does not know: keep it first.
                "--config",
                str(kwok_stages(cp.workdir / "kwok-stages.yaml")),
                "--kubeconfig",
                kubeconfig,
                "--node-lease-duration-seconds",
                "40",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                "--node-ip",
                "127.0.0.1",
                "--cidr",
                "10.2.0.0/16",
                "--server-address",
                f"127.0.0.1:{free_port()}",
            ],
            cp.log_dir,
        )
        self.processes.extend([manager, scheduler, kwok])
        for name in self.node_names:
            cp.kubectl("apply", "-f", "-", input_text=json.dumps(fake_node(name)))
        kwok.wait_until(self._nodes_ready, 90, "Ready kwok nodes")
        return self

    def _nodes_ready(self) -> bool:
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
        ready = {
            n["metadata"]["name"]
            for n in nodes
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
        }
        return set(self.node_names) <= ready

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def fake_node(name: str) -> dict[str, object]:
    """A Node that kwok manages: big enough for the stage Jobs and GPU inference Deployments of every test in a
    session (tests leave their stacks running; 8 GPUs per node ran out late in a full run)."""
    capacity = {"cpu": "64", "memory": "256Gi", "pods": "250", "nvidia.com/gpu": "64"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def complete_pod(core: Any, name: str, namespace: str, exit_code: int) -> None:
    """Plays kubelet for a manually completed pod: marks its containers terminated with `exit_code`."""
    pod = core.read_namespaced_pod(name, namespace)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    statuses = [
        {
            "name": c.name,
            "image": c.image,
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {
                "terminated": {
                    "exitCode": exit_code,
                    "startedAt": now,
                    "finishedAt": now,
                    "reason": "Completed" if exit_code == 0 else "Error",
                }
            },
        }
        for c in pod.spec.containers
    ]
    status = {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": statuses}
    core.patch_namespaced_pod_status(name, namespace, {"status": status})
