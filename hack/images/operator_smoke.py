"""Runs the operator image's entry command for real (hack/build-images.sh, when the test binaries are
there): a real etcd + kube-apiserver with the CRD, `latentmas operator run` inside the image (buildah,
host network), then a stack applied and the children the operator creates for it listed.

    .venv/bin/python hack/images/operator_smoke.py IMAGE ENTRYPOINT...
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from latentmas.testing.controlplane import ControlPlane
from latentmas.testing.procs import ServerProcess, eventually, free_port

REPO = Path(__file__).resolve().parents[2]
BUILDAH = ["buildah", "--storage-driver", "vfs"]
STACK = {
    "apiVersion": "latentmas.io/v1alpha1",
    "kind": "LatentMASStack",
    "metadata": {"name": "smoke", "namespace": "default"},
    "spec": {
        "storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
        "experts": [{"name": "law", "domain": "law"}],
    },
}


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main(image: str, entrypoint: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="operator-smoke-"))
    plane = ControlPlane(work / "plane").start()
    container = subprocess.run([*BUILDAH, "from", image], capture_output=True, text=True, check=True).stdout.strip()
    operator: ServerProcess | None = None
    try:
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "latentmasstack.yaml"))

        def established() -> bool:
            crd = json.loads(plane.kubectl("get", "crd/latentmasstacks.latentmas.io", "-o", "json"))
            conditions = (crd.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        eventually(established, 60, "an Established CRD")
        health = free_port()
        argv = [*BUILDAH, "run", "--isolation", "chroot", "-v", f"{plane.kubeconfig}:/tmp/kubeconfig:ro", container]
        argv += ["--", *entrypoint, "operator", "run", "--kubeconfig", "/tmp/kubeconfig"]
        argv += ["--health-port", str(health), "--metrics-port", str(free_port())]
        operator = ServerProcess("operator-in-image", argv, work)
        operator.wait_until(lambda: healthy(health), 180, "operator liveness")
        print(f"operator in {image}: /healthz ok")
        plane.kubectl("apply", "-f", "-", input_text=json.dumps(STACK))

        def children() -> list[str]:
            listed = plane.kubectl("get", "serviceaccounts,roles,configmaps,deployments", "-n", "default", "-o", "name")
            return [line for line in listed.splitlines() if "smoke" in line]

        made = eventually(children, 120, "the operator in the image to create the stack's children")
        print(f"operator in {image} created for stack 'smoke': {' '.join(sorted(made))}")
    except Exception:
        if operator is not None:
            print(operator.log_tail(60), file=sys.stderr)
        raise
    finally:
        if operator is not None:
            operator.stop()
        subprocess.run([*BUILDAH, "rm", container], capture_output=True, check=False)
        plane.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
