"""Least privilege of the chart's RBAC on the real API server, checked by impersonating the accounts it
creates: the operator can apply every child it renders (and bind the static Spark driver role by
name) but cannot create pods, list Secrets or bind a role beyond what it holds; users' `edit`/`view`
roles gain the CRD through aggregation."""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from latentmas.cycle import cycle_runs
from latentmas.operator.children import StackRef, desired_children
from latentmas.operator.stagejobs import cycle_configmap, stage_object
from latentmas.spec import LatentMASStackSpec
from latentmas.testing.binaries import binary
from latentmas.testing.controlplane import Cluster
from latentmas.testing.fixtures import Helm
from latentmas.testing.procs import eventually

from tests.operator.conftest import REPO

pytestmark = pytest.mark.operator

CHART = REPO / "charts" / "latentmas"


@dataclass
class Installed:
    """The chart's RBAC rendered under a unique release name, applied to the cluster."""

    cluster: Cluster
    release: str
    system: str  # the operator's namespace
    stacks: str  # a namespace where stacks live

    @property
    def fullname(self) -> str:
        return f"{self.release}-latentmas"

    @property
    def operator(self) -> str:
        return f"system:serviceaccount:{self.system}:{self.fullname}"

    def kubectl(self, *args: str, as_user: str | None = None, input_text: str | None = None) -> tuple[int, str]:
        impersonate = ["--as", as_user] if as_user else []
        done = subprocess.run(
            [binary("kubectl"), "--kubeconfig", str(self.cluster.kubeconfig), *impersonate, *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.returncode, done.stdout + done.stderr

    def can(self, verb: str, resource: str, as_user: str, namespace: str | None = None) -> bool:
        ns = ["-n", namespace or self.stacks]
        _, out = self.kubectl("auth", "can-i", verb, resource, *ns, as_user=as_user)
        return out.strip().splitlines()[0] == "yes"

    def apply_as_operator(self, obj: dict[str, Any], *, create: bool = False, dry_run: bool = True) -> tuple[int, str]:
        verb = ["create"] if create else ["apply", "--server-side", "--field-manager", "latentmas-operator"]
        dry = ["--dry-run=server"] if dry_run else []
        return self.kubectl(*verb, *dry, "-f", "-", as_user=self.operator, input_text=json.dumps(obj))


@pytest.fixture(scope="module")
def rbac(helm: Helm, cluster: Cluster, crd_installed: Path) -> Installed:
    release = f"rb{uuid.uuid4().hex[:6]}"
    installed = Installed(cluster, release, f"{release}-system", f"{release}-stacks")
    for namespace in (installed.system, installed.stacks):
        cluster.kubectl("create", "namespace", namespace)
    only = ["-s", "templates/rbac.yaml", "-s", "templates/serviceaccount.yaml"]
    rendered = helm.run(
        "template", release, str(CHART), "-n", installed.system, "--kube-version", "1.34.0", *only
    ).stdout
    cluster.kubectl("apply", "-n", installed.system, "-f", "-", input_text=rendered)

    # RBAC is cached by the authorizer: wait until the new ClusterRoleBinding is in force.
    def in_force() -> bool:
        op = installed.operator
        return installed.can("get", "secrets", op) and installed.can("create", "rolebindings", op)

    eventually(in_force, 120, "the operator's bindings in force")
    return installed


def _spec() -> LatentMASStackSpec:
    """Every kind of child: Spark cleaning in client mode, a schedule, inference with an HPA and a PDB."""
    return LatentMASStackSpec.model_validate(
        {
            "storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "s3"}},
            "experts": [{"name": "law", "domain": "law"}],
            "schedule": {"cron": "0 3 * * *"},
            "pipeline": {"cleaning": {"engine": "spark", "sparkExecutors": 3}},
            "inference": {"autoscaling": {"enabled": True, "minReplicas": 2}},
        }
    )


def test_operator_can_apply_every_child_it_renders(rbac: Installed) -> None:
    spec = _spec()
    ref = StackRef("team", rbac.stacks, str(uuid.uuid4()))
    # Without their ownerReferences: the made-up owner does not exist, so the garbage collector would delete
    # the Roles under the test (binding them then is NotFound); RBAC does not look at owners.
    children = [without_owner(c) for c in desired_children(ref, spec, "img", f"{rbac.fullname}-spark-driver")]
    assert any(c["kind"] == "RoleBinding" and c["roleRef"]["kind"] == "ClusterRole" for c in children)
    assert {"PodDisruptionBudget", "HorizontalPodAutoscaler", "CronJob"} <= {c["kind"] for c in children}
    for child in children:  # for real: a RoleBinding is checked against the Role it binds
        # ... as the authorizer's cache knows it: a just-created Role may be NotFound for a moment (the
        # operator's next reconcile applies again, so the test tries again too).
        def applied(obj: dict[str, Any] = child) -> tuple[int, str] | None:
            code, out = rbac.apply_as_operator(obj, dry_run=False)
            return (code, out) if code == 0 or "NotFound" not in out else None

        code, out = eventually(applied, 120, f"{child['kind']} {child['metadata']['name']} applied", interval=1.0)
        assert code == 0, f"{child['kind']} {child['metadata']['name']}: {out}"
    runs = cycle_runs(spec)
    created = [
        without_owner(obj)
        for obj in (cycle_configmap(ref, spec, "c1", runs), *(stage_object(ref, spec, "c1", r, 1, False) for r in runs))
    ]
    for obj in created:
        code, out = rbac.apply_as_operator(obj, create=True)
        assert code == 0, f"{obj['kind']} {obj['metadata']['name']}: {out}"


def test_operator_holds_no_pod_writes_and_secrets_get_only(rbac: Installed) -> None:
    op = rbac.operator
    for verb in ("create", "patch", "update", "delete", "deletecollection"):
        assert not rbac.can(verb, "pods", op), f"operator may {verb} pods"
    assert rbac.can("list", "pods", op) and rbac.can("watch", "pods", op)
    assert rbac.can("get", "secrets", op)
    assert not rbac.can("list", "secrets", op) and not rbac.can("watch", "secrets", op)
    assert not rbac.can("update", "latentmasstacks.latentmas.io", op)
    assert not rbac.can("create", "persistentvolumeclaims", op)
    assert not rbac.can("escalate", "roles.rbac.authorization.k8s.io", op)
    assert not rbac.can("bind", "clusterroles.rbac.authorization.k8s.io/admin", op)
    assert rbac.can("bind", f"clusterroles.rbac.authorization.k8s.io/{rbac.fullname}-spark-driver", op)


def without_owner(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}
    return {**obj, "metadata": meta}


def _binding(namespace: str, kind: str, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"probe-{uuid.uuid4().hex[:6]}", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
    }


def test_operator_cannot_bind_or_write_a_role_beyond_what_it_holds(rbac: Installed) -> None:
    """RBAC cannot restrict `create rolebindings` by roleRef; escalation prevention does: binding (or
    writing) a role with rules the operator does not hold is Forbidden, whatever the Role is called."""
    ns = rbac.stacks
    wide = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "too-wide", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["pods", "secrets"], "verbs": ["create", "list", "patch"]}],
    }
    code, out = rbac.apply_as_operator(wide)
    assert code != 0 and "forbidden" in out.lower(), out
    rbac.cluster.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(wide))  # an admin writes it
    for kind, role in (("Role", "too-wide"), ("ClusterRole", "admin"), ("ClusterRole", "edit")):
        code, out = rbac.apply_as_operator(_binding(ns, kind, role))
        assert code != 0 and "forbidden" in out.lower(), f"{kind} {role}: {out}"
    narrow = {**wide, "metadata": {"name": "narrow", "namespace": ns}}
    narrow["rules"] = [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["x"], "verbs": ["get"]}]
    assert rbac.apply_as_operator(narrow)[0] == 0, "a role within the operator's own rights"
    code, out = rbac.apply_as_operator(_binding(ns, "ClusterRole", f"{rbac.fullname}-spark-driver"))
    assert code == 0, out


def test_edit_and_view_aggregate_the_stack_resource(rbac: Installed) -> None:
    ns = rbac.stacks
    for user, role in (("alice", "edit"), ("bob", "view")):
        binding = _binding(ns, "ClusterRole", role)
        binding["subjects"] = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        rbac.cluster.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(binding))
    resource = "latentmasstacks.latentmas.io"
    eventually(lambda: rbac.can("create", resource, "alice"), 180, "edit aggregates create on stacks")
    eventually(lambda: rbac.can("get", resource, "bob"), 180, "view aggregates get on stacks")
    assert rbac.can("delete", resource, "alice")
    assert not rbac.can("create", resource, "bob") and not rbac.can("patch", resource, "bob")
