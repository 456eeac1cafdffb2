"""The Helm chart and the plain manifests against the real API server and the real helm binary, and
every command the images, the chart and the Jobs run: it exists and answers `--help`. (Building the
images takes `make images`, too slow for the suite; the Dockerfiles' commands are checked here.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from latentmas.cycle import StageRun, cycle_runs
from latentmas.operator.children import StackRef, desired_children
from latentmas.operator.stagejobs import cycle_configmap, stage_object
from latentmas.spec import LatentMASStackSpec
from latentmas.stage import STAGES
from latentmas.testing.binaries import binary
from latentmas.testing.controlplane import Cluster, ControlPlane
from latentmas.testing.fixtures import Helm

from tests.operator.conftest import CRD_FILE, REPO

pytestmark = pytest.mark.operator

CHART = REPO / "charts" / "latentmas"
FULL_VALUES = ["--set", "minio.enabled=true", "--set", "exampleStack.enabled=true"]
KUBE_VERSION = ["--kube-version", "1.34.0"]  # offline `helm template` assumes 1.20 otherwise (chart kubeVersion)


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_helm_lint_is_clean(helm: Helm) -> None:
    for extra in ([], [*FULL_VALUES, "--set", "operator.watchNamespaces={team-a,team-b}"]):
        out = helm.run("lint", str(CHART), "--strict", *extra).stdout
        assert "1 chart(s) linted, 0 chart(s) failed" in out, out


def test_helm_template_is_accepted_by_the_api_server(
    helm: Helm, control_plane: ControlPlane, crd_installed: Path
) -> None:
    namespace = f"tpl-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", namespace)
    rendered = helm.run("template", "lms", str(CHART), "-n", namespace, *KUBE_VERSION, *FULL_VALUES).stdout
    kinds = sorted({d["kind"] for d in _docs(rendered)})
    assert kinds == sorted(
        {
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "Secret",
            "StatefulSet",
            "LatentMASStack",
        }
    )
    out = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input_text=rendered)
    assert "latentmasstack.latentmas.io/demo created (server dry run)" in out
    assert "deployment.apps/lms-latentmas created (server dry run)" in out


def test_helm_install_then_upgrade(helm: Helm, cluster: Cluster) -> None:
    namespace = f"helm-{uuid.uuid4().hex[:6]}"
    common = ["-n", namespace, "--wait", "--timeout", "300s"]
    # The session's CRD is managed by the test fixture (see the CRD upgrade test for the chart's own).
    minio = ["--set", "minio.enabled=true", "--set", "minio.persistence.enabled=false", "--set", "crds.install=false"]
    helm.run("install", "lms", str(CHART), "--create-namespace", *minio, *common)
    deployment = json.loads(cluster.kubectl("get", "deployment", "lms-latentmas", "-n", namespace, "-o", "json"))
    assert deployment["spec"]["strategy"]["type"] == "Recreate" and deployment["spec"]["replicas"] == 1
    assert deployment["status"]["readyReplicas"] == 1
    secret = json.loads(cluster.kubectl("get", "secret", "lms-latentmas-minio", "-n", namespace, "-o", "json"))
    helm.run("upgrade", "lms", str(CHART), *minio, "--set", "operator.workers=2", *common)
    status = json.loads(helm.run("status", "lms", "-n", namespace, "-o", "json").stdout)
    assert (status["version"], status["info"]["status"]) == (2, "deployed")
    upgraded = json.loads(cluster.kubectl("get", "deployment", "lms-latentmas", "-n", namespace, "-o", "json"))
    assert "--workers=2" in upgraded["spec"]["template"]["spec"]["containers"][0]["command"]
    kept = json.loads(cluster.kubectl("get", "secret", "lms-latentmas-minio", "-n", namespace, "-o", "json"))
    assert kept["data"]["secretKey"] == secret["data"]["secretKey"], "the generated MinIO password survives upgrades"
    helm.run("uninstall", "lms", "-n", namespace, "--wait")


def test_helm_upgrade_applies_a_crd_with_a_new_field(
    helm: Helm, cluster: Cluster, crd_installed: Path, tmp_path: Path
) -> None:
    """The CRD is a chart template (crds/ is never upgraded by Helm): `helm upgrade` with a chart whose
    CRD carries a new field serves that field; `helm uninstall` keeps the CRD. The session's CRD is
    adopted first, exactly as NOTES.txt tells users upgrading from chart 0.1.0."""
    name, release = "latentmasstacks.latentmas.io", "lmscrd"
    namespace = f"crdup-{uuid.uuid4().hex[:6]}"
    chart = tmp_path / "latentmas"
    shutil.copytree(CHART, chart)
    cluster.kubectl("label", "crd", name, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    adopt = [f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}"]
    cluster.kubectl("annotate", "crd", name, *adopt, "--overwrite")
    try:
        installed = helm.run("install", release, str(chart), "-n", namespace, "--create-namespace").stdout
        assert "helm upgrade` applies its new fields" in installed and "credentialsSecretRef" in installed
        crd_path = chart / "files" / "latentmasstack.yaml"
        crd_doc = yaml.safe_load(crd_path.read_text())
        spec_schema = crd_doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec_schema["properties"]["upgradeProbe"] = {"type": "string", "description": "Added by a newer chart."}
        crd_path.write_text(yaml.safe_dump(crd_doc, sort_keys=False))
        chart_yaml = chart / "Chart.yaml"
        chart_yaml.write_text(chart_yaml.read_text().replace("version: 0.1.0", "version: 0.1.1"))
        helm.run("upgrade", release, str(chart), "-n", namespace)

        def served_spec() -> dict:
            crd_now = json.loads(cluster.kubectl("get", "crd", name, "-o", "json"))
            return crd_now["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]

        assert served_spec()["upgradeProbe"]["description"] == "Added by a newer chart."
        helm.run("uninstall", release, "-n", namespace)
        assert "upgradeProbe" in served_spec(), "helm uninstall keeps the CRD (resource-policy keep)"
    finally:
        cluster.kubectl("replace", "-f", str(CRD_FILE))  # the session's CRD back, without Helm's ownership


def test_kustomize_base_and_example_stacks_are_accepted(control_plane: ControlPlane, crd_installed: Path) -> None:
    base = control_plane.kubectl("kustomize", str(REPO / "manifests" / "base"))
    assert {d["kind"] for d in _docs(base)} >= {"CustomResourceDefinition", "Deployment", "ClusterRole", "Namespace"}
    # A server-side dry run persists nothing, so the namespace the base creates must exist already.
    control_plane.kubectl("create", "namespace", "latentmas-system", check=False)
    out = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input_text=base)
    assert "deployment.apps/latentmas created (server dry run)" in out
    namespace = f"ex-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", namespace)
    examples = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
    assert [p.stem for p in examples] == ["gpu", "minimal-cpu", "scheduled"]
    for path in examples:
        out = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
        assert "created (server dry run)" in out
        LatentMASStackSpec.model_validate(yaml.safe_load(path.read_text())["spec"])


# --- every command that is invoked exists and answers --help ---------------------------------------------------


def _containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for obj in objects:
        spec = obj.get("spec") or {}
        template = (spec.get("jobTemplate") or {}).get("spec", spec).get("template") or {}
        found += (template.get("spec") or {}).get("containers") or []
    return found


def _dockerfile_commands(path: Path) -> list[list[str]]:
    text = path.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    # The runtime image's entrypoint runs any command other than Spark's driver/executor as given.
    if "latentmas.entrypoint" in entry:
        entry = entry[entry.index("latentmas.entrypoint") + 1 :]
    argv = [a for a in [*entry, *cmd] if a not in ("tini", "--")]
    # Build-time smoke checks: `&& /opt/venv/bin/latentmas <args> >/dev/null`.
    runs = [["latentmas", *shlex.split(args)] for args in re.findall(r"&& /opt/venv/bin/latentmas ([^>\n\\]*)", text)]
    return [argv, *runs]


def invoked_commands(helm: Helm) -> list[list[str]]:
    """Commands of the chart's pods, the manifests, the Dockerfiles and every child/Job the operator makes."""
    rendered = helm.run("template", "lms", str(CHART), *KUBE_VERSION, *FULL_VALUES).stdout
    base = subprocess.run(
        [binary("kubectl"), "kustomize", str(REPO / "manifests" / "base")], capture_output=True, text=True, check=True
    ).stdout
    spec = LatentMASStackSpec.model_validate(
        {
            "experts": [{"name": "law", "domain": "law"}],
            "schedule": {"cron": "0 3 * * *"},
            "pipeline": {"cleaning": {"engine": "spark", "sparkExecutors": 3}},
        }
    )
    ref = StackRef("team", "ns", "uid")
    objects = [*_docs(rendered), *_docs(base), *desired_children(ref, spec, "img")]
    objects += [stage_object(ref, spec, "c1", run, 1, spark_operator=False) for run in cycle_runs(spec)]
    commands = [c["command"] for c in _containers(objects)]
    spark_app = stage_object(ref, spec, "c1", StageRun("clean"), 1, spark_operator=True)
    commands.append(["latentmas", *spark_app["spec"]["arguments"]])
    commands += _dockerfile_commands(REPO / "Dockerfile") + _dockerfile_commands(REPO / "Dockerfile.operator")
    return commands


def test_every_invoked_command_answers_help(helm: Helm) -> None:
    commands = invoked_commands(helm)
    assert len(commands) >= 15
    checked = set()
    for argv in commands:
        if argv[0] != "latentmas":
            assert "minio server" in shlex.join(argv), f"unexpected third-party command {argv}"
            continue
        key = tuple(argv)
        if key in checked:
            continue
        checked.add(key)
        done = subprocess.run(
            [sys.executable, "-c", "from latentmas.cli import main; main()", *argv[1:], "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{shlex.join(argv)} --help failed: {done.stderr}"
        assert done.stdout.startswith("usage: latentmas"), argv
        if argv[1:3] == ["stage", "run"]:
            assert argv[3] in STAGES, f"stage {argv[3]!r} is not registered in latentmas.stage.STAGES"
    assert {c[1] for c in commands} >= {"operator", "serve", "stage", "trigger"}


def test_operator_image_needs_no_torch_or_spark() -> None:
    """Dockerfile.operator installs no data-plane dependencies: its commands must run without them."""
    blocked = ["torch", "transformers", "pyspark", "polars", "faiss", "sentence_transformers", "peft", "trl", "fastapi"]
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked in the operator image: ' + name)
sys.meta_path.insert(0, Block())
import latentmas.operator.handlers, latentmas.operator.reconciler, latentmas.crd
from latentmas.cli import main
sys.argv = ['latentmas'] + sys.argv[1:]
main()
"""
    for argv in (["operator", "run", "--help"], ["trigger", "x", "--help"], ["crd"]):
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def test_stage_jobs_carry_no_credentials(helm: Helm) -> None:
    """Credentials only by Secret reference: no ConfigMap, Job or CronJob the operator renders holds a value."""
    spec = LatentMASStackSpec.model_validate(
        {
            "storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "creds"}},
            "experts": [{"name": "law", "domain": "law"}],
            "schedule": {"cron": "0 3 * * *"},
        }
    )
    ref = StackRef("team", "ns", "uid")
    objects = [*desired_children(ref, spec, "img"), cycle_configmap(ref, spec, "c1", cycle_runs(spec))]
    objects += [stage_object(ref, spec, "c1", run, 1, False) for run in cycle_runs(spec)]
    for container in _containers(objects):
        for env in container.get("env") or []:
            if "S3" in env["name"]:
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "creds"
    assert sum(1 for c in _containers(objects) for e in c.get("env") or [] if e["name"].startswith("LATENTMAS_S3")) >= 4
