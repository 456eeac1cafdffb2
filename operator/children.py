"""The long-lived objects a stack owns, as pure functions of the stack: least-privilege RBAC for stage
Jobs, inference and the schedule trigger; the inference Deployment + Service; the serving config; and
the CronJob when `schedule` is set. The pod template depends only on the spec, never on promoted
versions, so promoting adapters never restarts the inference pods (they hot-reload); it carries a
checksum of the serving slice of the config, so a serving-config change rolls them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from latentmas.basesource import PVC_MOUNT_ROOT, parse_base_uri
from latentmas.operator import names
from latentmas.services.podstatus import CONFIGMAP_ENV
from latentmas.spec import GROUP, KIND, PLURAL, VERSION, LatentMASStackSpec, Resources, StageRetry
from latentmas.store import ACCESS_KEY_ENV, SECRET_KEY_ENV

SERVE_COMMAND = ["latentmas", "serve", "--config", f"{names.CONFIG_DIR}/serve.yaml", "--host", "0.0.0.0"]
SERVE_CONFIG_KEY = "serve.yaml"
READY_PATH = "/ready"
HEALTH_PATH = "/health"
TOKEN_ENV = "LATENTMAS_API_TOKEN"
RUN_AS_USER = 10001


def to_yaml(value: Any) -> str:
    """YAML through libyaml when present: rendered on every reconcile, the pure-Python dumper dominates."""
    return yaml.dump(value, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=True)


@dataclass(frozen=True)
class StackRef:
    """Identity of the owning LatentMASStack (for names, labels and ownerReferences)."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, component: str, **extra_labels: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": names.labels(self.name, component, **extra_labels),
            "ownerReferences": [self.owner_reference()],
        }


def s3_env(spec: LatentMASStackSpec) -> list[dict[str, Any]]:
    """S3 credentials by Secret reference only: the values never pass through the operator."""
    ref = spec.storage.credentials_secret_ref
    if ref is None:
        return []
    return [
        {"name": ACCESS_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.access_key_key}}},
        {"name": SECRET_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secret_key_key}}},
    ]


def base_model_volumes(spec: LatentMASStackSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) that give a pod the base model's PersistentVolumeClaim, read-only, where
    `latentmas.basesource` expects it; none for other sources."""
    source = parse_base_uri(spec.base_model.uri)
    if source.kind != "pvc":
        return [], []
    volume = {"name": "base-model", "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}}
    mount = {"name": "base-model", "mountPath": f"{PVC_MOUNT_ROOT}/{source.claim}", "readOnly": True}
    return [volume], [mount]


def hub_token_env(spec: LatentMASStackSpec) -> list[dict[str, Any]]:
    """The hub token for gated hf:// bases, by Secret reference (the base stage reads HF_TOKEN)."""
    name = spec.base_model.token_secret_ref
    if name is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}}]


def resources(res: Resources) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if res.gpu:
        requests[res.gpu_resource_name] = res.gpu
        limits[res.gpu_resource_name] = res.gpu
    return {"requests": requests, "limits": limits}


def pod_placement(spec: LatentMASStackSpec, gpu: bool, override: StageRetry | None = None) -> dict[str, Any]:
    """nodeSelector/tolerations: a stage's own (`stages.<stage>`) when given, else the stack's on pods that
    request GPUs only (CPU-only pods are not pinned to GPU nodes)."""
    selector = override.node_selector if override and override.node_selector is not None else None
    tolerations = override.tolerations if override and override.tolerations is not None else None
    if selector is None:
        selector = spec.node_selector if gpu else {}
    if tolerations is None:
        tolerations = spec.tolerations if gpu else []
    placement: dict[str, Any] = {}
    if selector:
        placement["nodeSelector"] = dict(selector)
    if tolerations:
        placement["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in tolerations]
    return placement


def pod_extras(spec: LatentMASStackSpec) -> dict[str, Any]:
    """Pod fields every pod of the stack gets: priority class and image pull Secrets."""
    extras: dict[str, Any] = {}
    if spec.priority_class_name:
        extras["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        extras["imagePullSecrets"] = [{"name": name} for name in spec.image_pull_secrets]
    return extras


def security_context() -> dict[str, Any]:
    """Container settings that pass the Pod Security "restricted" profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """Pod settings for the "restricted" profile (seccomp also per container, for pods that merge specs)."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}


def _rbac(
    stack: StackRef, role: str, rules: list[dict[str, Any]], automount: bool | None = None
) -> list[dict[str, Any]]:
    name = names.service_account(stack.name, role)
    subject = {"kind": "ServiceAccount", "name": name, "namespace": stack.namespace}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": stack.metadata(name, role),
            "automountServiceAccountToken": bool(rules) if automount is None else automount,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": stack.metadata(name, role),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": stack.metadata(name, role),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [subject],
        },
    ]


SPARK_DRIVER_ROLE = "latentmas-spark-driver"


def spark_driver_binding(stack: StackRef, cluster_role: str) -> dict[str, Any]:
    """A Spark driver starts its executors as pods. The operator may not create pods itself, so it does
    not write these rules into a Role: it binds the static ClusterRole installed with it (the chart's
    `<release>-spark-driver`), which it may bind by name only (`bind` with resourceNames)."""
    name = names.child_name(stack.name, "jobs", "spark")
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": stack.metadata(name, "jobs"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [
            {"kind": "ServiceAccount", "name": names.service_account(stack.name, "jobs"), "namespace": stack.namespace}
        ],
    }


def rbac_objects(
    stack: StackRef, spec: LatentMASStackSpec, spark_driver_role: str = SPARK_DRIVER_ROLE
) -> list[dict[str, Any]]:
    """Least privilege: inference pods may only patch their stack's active-versions ConfigMap (never a
    pod), the trigger only its own stack, stage pods nothing (a Spark driver: its executors, through
    the static ClusterRole bound by name). The per-stack Roles hold only rules the operator holds
    itself, so binding them needs no `escalate` or `bind` on arbitrary roles."""
    inference_rules = [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [names.active_versions_configmap(stack.name)],
            "verbs": ["get", "patch"],
        }
    ]
    trigger_rules = [
        {"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [stack.name], "verbs": ["get", "patch"]}
    ]
    spark = spec.pipeline.cleaning.engine == "spark"
    objects = _rbac(stack, "jobs", [], automount=spark) + _rbac(stack, "inference", inference_rules)
    if spark:
        objects.append(spark_driver_binding(stack, spark_driver_role))
    if spec.schedule is not None:
        objects += _rbac(stack, "trigger", trigger_rules)
    return objects


def serve_config(stack: StackRef, spec: LatentMASStackSpec) -> dict[str, Any]:
    """The serving ConfigMap: the stack's identity and spec (no credentials, no promoted versions)."""
    config = {"namespace": stack.namespace, "stack": stack.name, "spec": spec.model_dump(mode="json", by_alias=True)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": stack.metadata(names.child_name(stack.name, "serving"), "inference"),
        "data": {SERVE_CONFIG_KEY: to_yaml(config)},
    }


def serving_slice(stack: StackRef, spec: LatentMASStackSpec) -> dict[str, Any]:
    """What `latentmas serve` reads from its config (`ServeSettings.from_spec`: storage, base model,
    inference) — without the replica count and autoscaling, which scale without a restart."""
    dump = spec.model_dump(mode="json", by_alias=True)
    inference = {k: v for k, v in dump["inference"].items() if k not in ("replicas", "autoscaling")}
    return {
        "namespace": stack.namespace,
        "stack": stack.name,
        "storage": dump["storage"],
        "baseModel": dump["baseModel"],
        "inference": inference,
    }


def inference_deployment(stack: StackRef, spec: LatentMASStackSpec) -> dict[str, Any]:
    inference = spec.inference
    name = names.inference_name(stack.name)
    selector = {names.LABEL_STACK: stack.name, names.COMPONENT: "inference"}
    base_volumes, base_mounts = base_model_volumes(spec)
    env: list[dict[str, Any]] = [
        *s3_env(spec),
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": CONFIGMAP_ENV, "value": names.active_versions_configmap(stack.name)},
    ]
    if inference.auth_secret_ref:
        env.append(
            {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": inference.auth_secret_ref, "key": "token"}}}
        )
    probe_port = {"port": "http"}
    container = {
        "name": "inference",
        "image": inference.image,
        "command": [*SERVE_COMMAND, "--port", str(inference.port)],
        "ports": [{"name": "http", "containerPort": inference.port}],
        "env": env,
        "resources": resources(inference.resources),
        "readinessProbe": {"httpGet": {"path": READY_PATH, **probe_port}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": {"path": HEALTH_PATH, **probe_port},
            "periodSeconds": 10,
            "failureThreshold": 6,
            "initialDelaySeconds": 30,
        },
        "startupProbe": {"httpGet": {"path": HEALTH_PATH, **probe_port}, "periodSeconds": 5, "failureThreshold": 120},
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": "/tmp"},
            *base_mounts,
        ],
        "securityContext": security_context(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": stack.metadata(name, "inference"),
        "spec": {
            # With an HPA the replica count is its own: leaving the field out lets it scale undisturbed.
            **({} if inference.autoscaling.enabled else {"replicas": inference.replicas}),
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": names.labels(stack.name, "inference"),
                    # The server reads its config once: a serving-config change rolls the pods; a
                    # training or schedule edit (not in the slice) never restarts them.
                    "annotations": {names.ANNOTATION_SERVING_CONFIG: names.stable_hash(serving_slice(stack, spec))},
                },
                "spec": {
                    "serviceAccountName": names.service_account(stack.name, "inference"),
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": names.child_name(stack.name, "serving")}},
                        {"name": "cache", "emptyDir": {}},
                        *base_volumes,
                    ],
                    **pod_placement(spec, gpu=inference.resources.gpu > 0),
                    **pod_extras(spec),
                },
            },
        },
    }


def active_versions(stack: StackRef) -> dict[str, Any]:
    """Created empty by the operator; each inference pod merge-patches its own `data[<pod>]` entry."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": stack.metadata(names.active_versions_configmap(stack.name), "inference"),
    }


def inference_service(stack: StackRef, spec: LatentMASStackSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": stack.metadata(names.inference_name(stack.name), "inference"),
        "spec": {
            "selector": {names.LABEL_STACK: stack.name, names.COMPONENT: "inference"},
            "ports": [{"name": "http", "port": spec.inference.port, "targetPort": "http"}],
            # Reasoning sessions live in the pod that created them (emptyDir): one client stays on one pod.
            "sessionAffinity": "ClientIP",
        },
    }


def several_pods(spec: LatentMASStackSpec) -> bool:
    """Whether inference may run more than one pod (then it gets a PodDisruptionBudget)."""
    scaling = spec.inference.autoscaling
    return scaling.min_replicas > 1 if scaling.enabled else spec.inference.replicas > 1


def inference_pdb(stack: StackRef) -> dict[str, Any]:
    """At most one inference pod voluntarily disrupted (drain, upgrade) at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": stack.metadata(names.inference_name(stack.name), "inference"),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {names.LABEL_STACK: stack.name, names.COMPONENT: "inference"}},
        },
    }


def inference_hpa(stack: StackRef, spec: LatentMASStackSpec) -> dict[str, Any]:
    scaling = spec.inference.autoscaling
    name = names.inference_name(stack.name)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": stack.metadata(name, "inference"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization},
                    },
                }
            ],
        },
    }


def endpoint(stack: StackRef, spec: LatentMASStackSpec) -> str:
    return f"http://{names.inference_name(stack.name)}.{stack.namespace}.svc:{spec.inference.port}"


def trigger_command(stack: StackRef) -> list[str]:
    """The CronJob pod's command; the nonce is the Job's name, so one scheduled run is one cycle."""
    return [
        "latentmas",
        "trigger",
        stack.name,
        "--namespace",
        stack.namespace,
        "--source",
        "schedule",
        "--nonce",
        "$(JOB_NAME)",
    ]


def cronjob(stack: StackRef, spec: LatentMASStackSpec, trigger_image: str) -> dict[str, Any]:
    schedule = spec.schedule
    assert schedule is not None
    job_labels = names.labels(stack.name, "trigger")
    cron_spec: dict[str, Any] = {
        "schedule": schedule.cron,
        "suspend": schedule.suspend,
        "concurrencyPolicy": schedule.concurrency_policy,
        "successfulJobsHistoryLimit": schedule.successful_jobs_history_limit,
        "failedJobsHistoryLimit": schedule.failed_jobs_history_limit,
        "jobTemplate": {
            "metadata": {"labels": job_labels},
            "spec": {
                "backoffLimit": 2,
                "activeDeadlineSeconds": 300,
                "template": {
                    "metadata": {"labels": job_labels},
                    "spec": {
                        "restartPolicy": "Never",
                        "serviceAccountName": names.service_account(stack.name, "trigger"),
                        "securityContext": pod_security_context(),
                        "containers": [
                            {
                                "name": "trigger",
                                "image": trigger_image,
                                "command": trigger_command(stack),
                                "env": [
                                    {
                                        "name": "JOB_NAME",
                                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}},
                                    }
                                ],
                                "resources": {
                                    "requests": {"cpu": "10m", "memory": "64Mi"},
                                    "limits": {"memory": "256Mi"},
                                },
                                "securityContext": security_context(),
                            }
                        ],
                        **pod_extras(spec),
                    },
                },
            },
        },
    }
    if schedule.time_zone:
        cron_spec["timeZone"] = schedule.time_zone
    if schedule.starting_deadline_seconds:
        cron_spec["startingDeadlineSeconds"] = schedule.starting_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": stack.metadata(names.cronjob_name(stack.name), "trigger"),
        "spec": cron_spec,
    }


def desired_children(
    stack: StackRef, spec: LatentMASStackSpec, trigger_image: str, spark_driver_role: str = SPARK_DRIVER_ROLE
) -> list[dict[str, Any]]:
    """Every long-lived child, in the order to apply them (RBAC and config before the pods using them)."""
    objects = rbac_objects(stack, spec, spark_driver_role)
    if spec.inference.enabled:
        objects += [
            active_versions(stack),
            serve_config(stack, spec),
            inference_deployment(stack, spec),
            inference_service(stack, spec),
        ]
        if several_pods(spec):
            objects.append(inference_pdb(stack))
        if spec.inference.autoscaling.enabled:
            objects.append(inference_hpa(stack, spec))
    if spec.schedule is not None:
        objects.append(cronjob(stack, spec, trigger_image))
    return objects


def obsolete_kinds(spec: LatentMASStackSpec) -> list[tuple[str, str]]:
    """(kind, name-role) of children that must be deleted because the spec no longer wants them."""
    gone: list[tuple[str, str]] = []
    if spec.pipeline.cleaning.engine != "spark":
        gone.append(("RoleBinding", "jobs-spark"))
    if spec.schedule is None:
        gone += [("CronJob", "evolve"), ("ServiceAccount", "trigger"), ("Role", "trigger"), ("RoleBinding", "trigger")]
    if not spec.inference.enabled:
        gone += [
            ("Deployment", "inference"),
            ("Service", "inference"),
            ("ConfigMap", "serving"),
            ("ConfigMap", "active-versions"),
        ]
    if not spec.inference.enabled or not several_pods(spec):
        gone.append(("PodDisruptionBudget", "inference"))
    if not spec.inference.enabled or not spec.inference.autoscaling.enabled:
        gone.append(("HorizontalPodAutoscaler", "inference"))
    return gone
