"""The runtime image's entrypoint (behind tini). Spark on Kubernetes starts its pods with no command of
their own, only an argument: `driver <spark-submit args>` for a driver pod (cluster mode, e.g. a
SparkApplication) and `executor` for an executor pod, whose settings all arrive as environment variables.
The pyspark wheel has `spark-class`/`spark-submit` and the jars but no entrypoint for that, hence this one.
Any other arguments are a command run as they are (`latentmas stage run …`).

Set LATENTMAS_ENTRYPOINT_DRY_RUN=1 to print the resolved command as JSON instead of running it."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

EXECUTOR_BACKEND = "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend"
DRY_RUN_ENV = "LATENTMAS_ENTRYPOINT_DRY_RUN"
# What a Spark driver sets on every executor pod it creates (Spark's k8s Constants); the pod IP and
# name come from the downward API.
EXECUTOR_REQUIRED = (
    "SPARK_DRIVER_URL",
    "SPARK_EXECUTOR_ID",
    "SPARK_EXECUTOR_CORES",
    "SPARK_APPLICATION_ID",
    "SPARK_EXECUTOR_POD_IP",
)
_JAVA_OPT = re.compile(r"^SPARK_JAVA_OPT_(\d+)$")


class EntrypointError(Exception):
    """A pod started without what its role needs; the message is one line naming it."""


def spark_home(env: Mapping[str, str]) -> Path:
    """SPARK_HOME if set (the image sets it), else the Spark distribution inside the pyspark wheel."""
    if env.get("SPARK_HOME"):
        return Path(env["SPARK_HOME"])
    from latentmas.sparkjars import spark_home as wheel_home

    return wheel_home()


def java_options(env: Mapping[str, str]) -> list[str]:
    """The executor's JVM options: Spark passes them as SPARK_JAVA_OPT_0, _1, … (order matters)."""
    numbered = sorted((int(m.group(1)), value) for key, value in env.items() if (m := _JAVA_OPT.match(key)))
    return [value for _, value in numbered]


def classpath(env: Mapping[str, str], home: Path) -> str:
    """Extra class path (spark.executor.extraClassPath arrives as SPARK_CLASSPATH), Spark's jars (with the
    baked s3a jars), then any Hadoop/Spark conf folders, as `spark-class` would build it."""
    parts = [env.get("SPARK_CLASSPATH", ""), f"{home}/jars/*", env.get("SPARK_DIST_CLASSPATH", "")]
    parts += [env[name] for name in ("HADOOP_CONF_DIR", "SPARK_CONF_DIR") if env.get(name)]
    return ":".join(p for p in parts if p)


def java_binary(env: Mapping[str, str]) -> str:
    return f"{env['JAVA_HOME']}/bin/java" if env.get("JAVA_HOME") else "java"


def executor_command(env: Mapping[str, str]) -> list[str]:
    """The executor JVM, talking back to the driver at SPARK_DRIVER_URL."""
    missing = [name for name in EXECUTOR_REQUIRED if not env.get(name)]
    if missing:
        raise EntrypointError(f"executor: environment variable {missing[0]} is not set (Spark's driver sets it)")
    memory = env.get("SPARK_EXECUTOR_MEMORY")
    command = [
        java_binary(env),
        *java_options(env),
        *([f"-Xms{memory}", f"-Xmx{memory}"] if memory else []),
        "-cp",
        classpath(env, spark_home(env)),
        EXECUTOR_BACKEND,
        "--driver-url", env["SPARK_DRIVER_URL"],
        "--executor-id", env["SPARK_EXECUTOR_ID"],
        "--cores", env["SPARK_EXECUTOR_CORES"],
        "--app-id", env["SPARK_APPLICATION_ID"],
        "--hostname", env["SPARK_EXECUTOR_POD_IP"],
        "--resourceProfileId", env.get("SPARK_RESOURCE_PROFILE_ID", "0"),
    ]  # fmt: skip
    if env.get("SPARK_EXECUTOR_POD_NAME"):
        command += ["--podName", env["SPARK_EXECUTOR_POD_NAME"]]
    return command


def driver_command(args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """A cluster-mode driver pod: spark-submit in client mode inside the pod, listening on the pod IP."""
    bind = env.get("SPARK_DRIVER_BIND_ADDRESS")
    if not bind:
        raise EntrypointError("driver: environment variable SPARK_DRIVER_BIND_ADDRESS is not set (Spark sets it)")
    submit = str(spark_home(env) / "bin" / "spark-submit")
    return [submit, "--conf", f"spark.driver.bindAddress={bind}", "--deploy-mode", "client", *args]


def command(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """What the container runs for these arguments."""
    if not argv:
        return ["latentmas", "--help"]
    if argv[0] == "executor":
        return executor_command(env)
    if argv[0] == "driver":
        return driver_command(argv[1:], env)
    return list(argv)


def main() -> None:
    try:
        resolved = command(sys.argv[1:], os.environ)
    except EntrypointError as err:
        sys.exit(f"entrypoint: {err}")
    if os.environ.get(DRY_RUN_ENV) == "1":
        print(json.dumps(resolved))
        return
    sys.stdout.flush()
    os.execvp(resolved[0], resolved)


if __name__ == "__main__":
    main()
