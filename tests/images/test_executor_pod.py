"""Executor pods are created by the Spark driver, not the operator: the pod template the driver gives
them (core/spark.py) must make them pass Pod Security "restricted". A real client-mode Spark driver on
the real kube-apiserver (`k8s://` master) creates its executor pod in a namespace enforcing the profile;
the template, completed the way Spark completes it, is also dry-run there, and Spark's bare executor
pod is refused."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from latentmas.spark import EXECUTOR_CONTAINER, deployment_confs, executor_pod_template, kubernetes_confs
from latentmas.sparkjars import bundled_hadoop_version, spark_home
from latentmas.spec import LatentMASStackSpec
from latentmas.testing.controlplane import ControlPlane
from latentmas.testing.procs import ServerProcess

from tests.operator.conftest import new_namespace
from tests.operator.test_pod_security import dry_run

pytestmark = pytest.mark.operator

PLACED = LatentMASStackSpec.model_validate(
    {
        "experts": [{"name": "law", "domain": "law"}],
        "pipeline": {"cleaning": {"engine": "spark", "sparkExecutors": 2}},
        "stages": {
            "clean": {
                "nodeSelector": {"pool": "spark"},
                "tolerations": [{"key": "spark", "operator": "Exists", "effect": "NoSchedule"}],
            }
        },
        "nodeSelector": {"pool": "gpu"},  # the stack's: GPU pods only, never CPU executors
    }
)


def as_spark_creates_it(template: dict[str, Any], namespace: str, name: str) -> dict[str, Any]:
    """The template completed the way Spark's executor feature steps complete it (3.5)."""
    pod = copy.deepcopy(template)
    pod["metadata"] = {"name": name, "namespace": namespace, "labels": {"spark-role": "executor"}}
    container = pod["spec"]["containers"][0]
    container |= {
        "image": "localhost/latentmas:0.1.0",
        "args": ["executor"],
        "env": [
            {"name": "SPARK_DRIVER_URL", "value": "spark://CoarseGrainedScheduler@10.0.0.1:7078"},
            {"name": "SPARK_EXECUTOR_ID", "value": "1"},
            {"name": "SPARK_EXECUTOR_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "SPARK_JAVA_OPT_0", "value": "-Dspark.driver.port=7078"},
        ],
        "ports": [{"name": "blockmanager", "containerPort": 7079}],
        "resources": {"requests": {"cpu": "1", "memory": "1408Mi"}, "limits": {"memory": "1408Mi"}},
        "volumeMounts": [
            {"name": "spark-local-dir-1", "mountPath": "/var/data/spark-1"},
            {"name": "spark-conf-volume-exec", "mountPath": "/opt/spark/conf"},
        ],
    }
    pod["spec"] |= {
        "restartPolicy": "Never",
        "hostname": name,
        "volumes": [
            {"name": "spark-local-dir-1", "emptyDir": {}},
            {"name": "spark-conf-volume-exec", "configMap": {"name": "spark-exec-conf-map"}},
        ],
    }
    return pod


def test_executor_pods_pass_the_restricted_profile(control_plane: ControlPlane, tmp_path: Path) -> None:
    namespace = new_namespace(control_plane)
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    # The template the driver writes and points Spark at, as Spark reads it back.
    confs = kubernetes_confs(PLACED, tmp_path)
    assert confs["spark.kubernetes.executor.podTemplateContainerName"] == EXECUTOR_CONTAINER
    written = json.loads(Path(confs["spark.kubernetes.executor.podTemplateFile"]).read_text())
    assert written == executor_pod_template(PLACED)
    assert written["spec"]["nodeSelector"] == {"pool": "spark"} and written["spec"]["tolerations"][0]["key"] == "spark"
    for i, template in enumerate([written, executor_pod_template(None)]):
        done = dry_run(control_plane, as_spark_creates_it(template, namespace, f"clean-exec-{i}"))
        assert done.returncode == 0, done.stderr
    # The check can fail: without the template's settings (Spark's bare executor pod) the namespace refuses it.
    bare = {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": EXECUTOR_CONTAINER}]}}
    done = dry_run(control_plane, as_spark_creates_it(bare, namespace, "clean-exec-bare"))
    assert done.returncode != 0 and "restricted" in done.stderr
    for field in ("allowPrivilegeEscalation", "capabilities", "runAsNonRoot", "seccompProfile"):
        assert field in done.stderr


def test_drivers_choose_jars_and_executor_template_by_where_they_run(tmp_path: Path) -> None:
    """Outside the image the s3a jars are resolved as packages of the bundled Hadoop; in the image they
    are baked (no packages). Only a client-mode driver on Kubernetes (it starts its own JVM) sets the
    template: inside a SparkApplication driver (spark-submit hands Python its gateway) the Spark operator
    renders executor pods from the SparkApplication's own security settings."""
    wheel_jars = spark_home() / "jars"
    k8s = "k8s://https://kubernetes.default.svc:443"
    local = deployment_confs("local[2]", {}, wheel_jars, PLACED, tmp_path)
    assert local["spark.jars.packages"] == f"org.apache.hadoop:hadoop-aws:{bundled_hadoop_version(wheel_jars)}"
    assert not any(key.startswith("spark.kubernetes.") for key in local)
    baked = tmp_path / "jars"
    baked.mkdir()
    (baked / "hadoop-aws-3.3.4.jar").touch()
    submit = deployment_confs(k8s, {}, baked, PLACED, tmp_path)
    assert set(submit) == {
        "spark.kubernetes.executor.podTemplateFile",
        "spark.kubernetes.executor.podTemplateContainerName",
    }
    assert deployment_confs(k8s, {"PYSPARK_GATEWAY_PORT": "40123"}, baked, PLACED, tmp_path) == {}


K8S_DRIVER = """
import json, sys
from pathlib import Path
from pyspark.sql import SparkSession
from latentmas.spark import kubernetes_confs
from latentmas.spec import LatentMASStackSpec
server, token, namespace, spec_json, folder = sys.argv[1:]
master = "k8s://" + server
confs = kubernetes_confs(LatentMASStackSpec.model_validate_json(spec_json), Path(folder))
confs |= {
    "spark.kubernetes.namespace": namespace,
    "spark.kubernetes.container.image": "localhost/latentmas:0.1.0",
    "spark.kubernetes.executor.podNamePrefix": "clean-real",
    "spark.kubernetes.authenticate.oauthToken": token,
    "spark.kubernetes.trust.certificates": "true",
    "spark.executor.instances": "1",
    "spark.driver.host": "127.0.0.1",
    "spark.ui.enabled": "false",
}
builder = SparkSession.builder.master(master).appName("restricted-executors")
for key, value in confs.items():
    builder = builder.config(key, value)
builder.getOrCreate()
print("driver up", flush=True)
sys.stdin.read()  # until the test is done
"""


def test_a_real_driver_creates_restricted_executor_pods(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Spark itself renders the pod (its env, volumes, ports, resources on our template); the apiserver's
    Pod Security admission decides. No kubelet is needed: admission happens at creation."""
    namespace = new_namespace(control_plane)
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    script = tmp_path / "driver.py"
    script.write_text(K8S_DRIVER)
    argv = [sys.executable, str(script), control_plane.server, control_plane.token, namespace]
    argv += [PLACED.model_dump_json(by_alias=True), str(tmp_path)]
    driver = ServerProcess("k8s-driver", argv, tmp_path, env={"PYSPARK_PYTHON": sys.executable})

    def executor_pods() -> list[dict[str, Any]]:
        listed = control_plane.kubectl("get", "pods", "-n", namespace, "-l", "spark-role=executor", "-o", "json")
        return list(json.loads(listed)["items"])

    try:
        driver.wait_until(lambda: bool(executor_pods()), 240, "its executor pod admitted")
        pods = executor_pods()
    finally:
        driver.stop()
    pod = pods[0]
    assert pod["spec"]["containers"][0]["args"] == ["executor"]
    assert pod["spec"]["nodeSelector"] == {"pool": "spark"}
    env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    assert {"SPARK_DRIVER_URL", "SPARK_EXECUTOR_ID", "SPARK_EXECUTOR_POD_IP", "SPARK_APPLICATION_ID"} <= env
    # The same pod, as Spark made it, without the template's security settings is refused.
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "clean-real-bare", "namespace": namespace}}
    bare["spec"] = {k: v for k, v in pod["spec"].items() if k not in ("securityContext", "nodeName")}
    for container in bare["spec"]["containers"]:
        container.pop("securityContext")
    done = dry_run(control_plane, bare)
    assert done.returncode != 0 and "restricted" in done.stderr
