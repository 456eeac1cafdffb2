"""One stage attempt as a Kubernetes object: a Job running `latentmas stage run <stage> --config …`, or
for Spark cleaning a SparkApplication (Spark operator installed) or a Job whose driver starts its
executors through the in-cluster API. Configs come from the cycle's ConfigMap; credentials only from
the Secret the spec references."""

from __future__ import annotations

from typing import Any, Literal

from latentmas.cycle import StageRun
from latentmas.operator import names
from latentmas.operator.children import (
    StackRef,
    base_model_volumes,
    hub_token_env,
    pod_extras,
    pod_placement,
    pod_security_context,
    resources,
    s3_env,
    security_context,
    to_yaml,
)
from latentmas.spec import LatentMASStackSpec, Resources
from latentmas.stage import StageConfig
from latentmas.training.distributed import distributed_train_job

SparkMode = Literal["none", "local", "submit", "application"]
SPARK_APP_GROUP = "sparkoperator.k8s.io"
SPARK_APP_VERSION = "v1beta2"
SPARK_APP_PLURAL = "sparkapplications"
SPARK_VERSION = "3.5.5"
IN_CLUSTER_MASTER = "k8s://https://kubernetes.default.svc:443"
SPARK_ENTRY = "local:///opt/latentmas/latentmas.py"
GPU_STAGES = frozenset({"base", "train", "router", "evaluate"})
BASE_STAGES = frozenset({"base", "train", "router", "evaluate", "promote"})  # stages that load the base model
DEFAULT_RESOURCES = Resources(cpu="1", memory="2Gi")


def config_path(run: StageRun) -> str:
    return f"{names.CONFIG_DIR}/{run.id}.yaml"


def stage_command(run: StageRun) -> list[str]:
    return ["latentmas", "stage", "run", run.stage, "--config", config_path(run)]


def spark_mode(spec: LatentMASStackSpec, run: StageRun, spark_operator_installed: bool) -> SparkMode:
    """Spark cleaning: SparkApplication when the Spark operator is there, else executors through the
    in-cluster API when more than one is asked for, else Spark local mode inside the Job."""
    cleaning = spec.pipeline.cleaning
    if run.stage != "clean" or cleaning.engine != "spark":
        return "none"
    if spark_operator_installed:
        return "application"
    return "submit" if cleaning.spark_executors > 1 else "local"


def stage_resources(spec: LatentMASStackSpec, run: StageRun) -> Resources:
    """`stages.<stage>.resources` when given, else the stage kind's (training, Spark, small default)."""
    override = spec.stages.get(run.stage)
    if override is not None and override.resources is not None:
        return override.resources
    if run.stage in GPU_STAGES:
        return spec.pipeline.training.resources
    if run.stage == "clean" and spec.pipeline.cleaning.engine == "spark":
        return spec.pipeline.cleaning.spark_resources
    if run.stage == "index" and spec.pipeline.rag.gpu:  # embeddings on the GPU (jobs/index.py)
        gpu_name = spec.pipeline.training.resources.gpu_resource_name
        return DEFAULT_RESOURCES.model_copy(update={"gpu": spec.pipeline.rag.gpu, "gpu_resource_name": gpu_name})
    return DEFAULT_RESOURCES


def cycle_configmap(
    stack: StackRef,
    spec: LatentMASStackSpec,
    cycle: str,
    runs: list[StageRun],
    input_cycles: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One immutable ConfigMap per cycle with each run's StageConfig (`<run-id>.yaml`); `input_cycles`
    maps the runs this cycle reuses to the cycles holding their artifacts (left out when empty, so a
    stage image of the previous release reads a plain cycle's config)."""
    data = {}
    for run in runs:
        config = StageConfig(
            namespace=stack.namespace,
            stack=stack.name,
            cycle_id=cycle,
            expert=run.expert,
            stack_uid=stack.uid,
            input_cycles=dict(input_cycles or {}),
            spec=spec,
        )
        dumped = config.model_dump(mode="json", by_alias=True)
        if not config.input_cycles:
            dumped.pop("inputCycles", None)
        data[f"{run.id}.yaml"] = to_yaml(dumped)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": stack.metadata(
            names.cycle_configmap(stack.name, cycle), "stage-config", **{names.LABEL_CYCLE: cycle}
        ),
        "immutable": True,
        "data": data,
    }


def _spark_submit_env(stack: StackRef, spec: LatentMASStackSpec, job: str) -> list[dict[str, Any]]:
    cleaning = spec.pipeline.cleaning
    executor = cleaning.spark_resources
    confs = {
        "spark.kubernetes.container.image": spec.pipeline.training.image,
        "spark.kubernetes.namespace": stack.namespace,
        "spark.kubernetes.authenticate.driver.serviceAccountName": names.service_account(stack.name, "jobs"),
        "spark.kubernetes.executor.podNamePrefix": job,
        "spark.executor.instances": str(cleaning.spark_executors),
        "spark.executor.cores": executor.cpu,
        "spark.executor.memory": executor.memory.replace("Gi", "g").replace("Mi", "m"),
        "spark.driver.host": "$(POD_IP)",
    }
    args = " ".join(f"--conf {k}={v}" for k, v in confs.items()) + " pyspark-shell"
    return [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "SPARK_MASTER", "value": IN_CLUSTER_MASTER},
        {"name": "PYSPARK_SUBMIT_ARGS", "value": args},
    ]


def stage_job(
    stack: StackRef, spec: LatentMASStackSpec, cycle: str, run: StageRun, attempt: int, mode: SparkMode
) -> dict[str, Any]:
    """The Job of one attempt; retries are new Jobs (backoffLimit 0), so attempts are counted exactly."""
    name = names.job_name(stack.name, cycle, run.id, attempt)
    retry = spec.retry_for(run.stage)
    res = stage_resources(spec, run)
    run_labels = {
        names.LABEL_CYCLE: cycle,
        names.LABEL_RUN: run.id,
        names.LABEL_STAGE: run.stage,
        names.LABEL_ATTEMPT: str(attempt),
    }
    env = [*s3_env(spec), {"name": "LATENTMAS_CYCLE", "value": cycle}]
    if run.stage == "base":
        env += hub_token_env(spec)
    base_volumes, base_mounts = base_model_volumes(spec) if run.stage in BASE_STAGES else ([], [])
    if mode == "submit":
        env += _spark_submit_env(stack, spec, name)
    elif mode == "local":
        env.append({"name": "SPARK_MASTER", "value": f"local[{max(1, int(float(res.cpu)))}]"})
    container = {
        "name": "stage",
        "image": spec.pipeline.training.image,
        "command": stage_command(run),
        "env": env,
        "resources": resources(res),
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True},
            {"name": "work", "mountPath": "/tmp"},
            *base_mounts,
        ],
        "securityContext": security_context(),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": stack.metadata(name, "stage", **run_labels),
        "spec": {
            "backoffLimit": 0,
            # A pod evicted by a node drain or preemption (DisruptionTarget) is replaced without using up
            # the attempt: only real failures count.
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
            "activeDeadlineSeconds": retry.deadline_seconds,
            "template": {
                "metadata": {
                    "labels": names.labels(stack.name, "stage", **run_labels),
                    "annotations": dict(spec.stage_pod_annotations),
                },
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": names.service_account(stack.name, "jobs"),
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": names.cycle_configmap(stack.name, cycle)}},
                        {"name": "work", "emptyDir": {}},
                        *base_volumes,
                    ],
                    **pod_placement(spec, res.gpu > 0, spec.stages.get(run.stage)),
                    **pod_extras(spec),
                },
            },
        },
    }


def _spark_pod(spec: LatentMASStackSpec, res: Resources, cm: str, sa: str | None) -> dict[str, Any]:
    ref = spec.storage.credentials_secret_ref
    pod: dict[str, Any] = {
        "cores": max(1, int(float(res.cpu))),
        "memory": res.memory.replace("Gi", "g").replace("Mi", "m"),
        "labels": {},
        "configMaps": [{"name": cm, "path": names.CONFIG_DIR}],
        "env": [{"name": "SPARK_MASTER", "value": IN_CLUSTER_MASTER}],
        "securityContext": security_context(),
        "podSecurityContext": pod_security_context(),
        **pod_placement(spec, res.gpu > 0, spec.stages.get("clean")),
    }
    if ref is not None:
        pod["envSecretKeyRefs"] = {
            "LATENTMAS_S3_ACCESS_KEY": {"name": ref.name, "key": ref.access_key_key},
            "LATENTMAS_S3_SECRET_KEY": {"name": ref.name, "key": ref.secret_key_key},
        }
    if sa:
        pod["serviceAccount"] = sa
    return pod


def spark_application(
    stack: StackRef, spec: LatentMASStackSpec, cycle: str, run: StageRun, attempt: int
) -> dict[str, Any]:
    """The cleaning stage for the Spark operator; its driver runs the same `latentmas stage run clean`."""
    name = names.job_name(stack.name, cycle, run.id, attempt)
    cleaning = spec.pipeline.cleaning
    run_labels = {
        names.LABEL_CYCLE: cycle,
        names.LABEL_RUN: run.id,
        names.LABEL_STAGE: run.stage,
        names.LABEL_ATTEMPT: str(attempt),
    }
    cm = names.cycle_configmap(stack.name, cycle)
    executor = _spark_pod(spec, cleaning.spark_resources, cm, None)
    executor["instances"] = cleaning.spark_executors
    return {
        "apiVersion": f"{SPARK_APP_GROUP}/{SPARK_APP_VERSION}",
        "kind": "SparkApplication",
        "metadata": stack.metadata(name, "stage", **run_labels),
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": spec.pipeline.training.image,
            "mainApplicationFile": SPARK_ENTRY,
            "arguments": stage_command(run)[1:],
            "sparkVersion": SPARK_VERSION,
            "restartPolicy": {"type": "Never"},
            "timeToLiveSeconds": 86400,
            **({"imagePullSecrets": list(spec.image_pull_secrets)} if spec.image_pull_secrets else {}),
            "driver": _spark_pod(spec, DEFAULT_RESOURCES, cm, names.service_account(stack.name, "jobs")),
            "executor": executor,
        },
    }


def stage_object(
    stack: StackRef, spec: LatentMASStackSpec, cycle: str, run: StageRun, attempt: int, spark_operator: bool
) -> dict[str, Any]:
    mode = spark_mode(spec, run, spark_operator)
    if mode == "application":
        return spark_application(stack, spec, cycle, run, attempt)
    job = stage_job(stack, spec, cycle, run, attempt, mode)
    if run.stage == "train":
        return distributed_train_job(job, spec.pipeline.training)
    return job
