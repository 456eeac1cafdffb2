"""The image entrypoint answers Spark on Kubernetes's `driver` / `executor` arguments: the commands it
resolves from the environment a Spark driver gives its pods, its one-line refusals, and for real: a
driver started through it with spark-submit, and an executor started through it that registers with a
driver on a standalone master (started by spark-class) and runs that driver's tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from latentmas.entrypoint import (
    EXECUTOR_BACKEND,
    EXECUTOR_REQUIRED,
    EntrypointError,
    command,
    driver_command,
    executor_command,
)
from latentmas.sparkjars import spark_home
from latentmas.testing.procs import ServerProcess, eventually, free_port

pytestmark = pytest.mark.harness

EXECUTOR_ENV = {
    "SPARK_HOME": "/opt/spark",
    "JAVA_HOME": "/usr/lib/jvm/java-17",
    "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@10.0.0.1:7078",
    "SPARK_EXECUTOR_ID": "3",
    "SPARK_EXECUTOR_CORES": "2",
    "SPARK_EXECUTOR_MEMORY": "1024m",
    "SPARK_APPLICATION_ID": "spark-0123",
    "SPARK_EXECUTOR_POD_IP": "10.0.0.9",
    "SPARK_EXECUTOR_POD_NAME": "clean-exec-3",
    "SPARK_RESOURCE_PROFILE_ID": "1",
}


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_executor_command_carries_every_setting_spark_passes() -> None:
    java_opts = {f"SPARK_JAVA_OPT_{i}": f"-Dopt{i}" for i in (0, 1, 2, 10)}
    cmd = executor_command({**EXECUTOR_ENV, **java_opts, "SPARK_CLASSPATH": "/extra/*"})
    assert cmd[0] == "/usr/lib/jvm/java-17/bin/java"
    # JVM options in Spark's numeric order (10 after 2), before the main class.
    assert cmd[1:5] == ["-Dopt0", "-Dopt1", "-Dopt2", "-Dopt10"]
    assert cmd[5:7] == ["-Xms1024m", "-Xmx1024m"]
    assert flag(cmd, "-cp") == "/extra/*:/opt/spark/jars/*"
    backend = cmd.index(EXECUTOR_BACKEND)
    assert cmd.index("-cp") < backend
    args = dict(zip(cmd[backend + 1 :: 2], cmd[backend + 2 :: 2], strict=True))
    assert args == {
        "--driver-url": "spark://CoarseGrainedScheduler@10.0.0.1:7078",
        "--executor-id": "3",
        "--cores": "2",
        "--app-id": "spark-0123",
        "--hostname": "10.0.0.9",
        "--resourceProfileId": "1",
        "--podName": "clean-exec-3",
    }


def test_executor_defaults_for_optional_settings() -> None:
    env = {k: v for k, v in EXECUTOR_ENV.items() if k not in ("JAVA_HOME", "SPARK_EXECUTOR_MEMORY")}
    env = {k: v for k, v in env.items() if k not in ("SPARK_EXECUTOR_POD_NAME", "SPARK_RESOURCE_PROFILE_ID")}
    cmd = executor_command({**env, "HADOOP_CONF_DIR": "/etc/hadoop"})
    assert cmd[0] == "java" and not any(arg.startswith("-Xm") for arg in cmd)
    assert flag(cmd, "--resourceProfileId") == "0" and "--podName" not in cmd
    assert flag(cmd, "-cp") == "/opt/spark/jars/*:/etc/hadoop"


@pytest.mark.parametrize("missing", EXECUTOR_REQUIRED)
def test_executor_refuses_without_a_required_variable(missing: str) -> None:
    env = {k: v for k, v in EXECUTOR_ENV.items() if k != missing}
    with pytest.raises(EntrypointError, match=rf"^executor: environment variable {missing} is not set"):
        executor_command(env)


def test_driver_runs_spark_submit_in_client_mode_on_the_bind_address() -> None:
    args = ["--properties-file", "/opt/spark/conf/spark.properties", "local:///opt/latentmas/latentmas.py", "stage"]
    cmd = driver_command(args, {"SPARK_HOME": "/opt/spark", "SPARK_DRIVER_BIND_ADDRESS": "10.0.0.1"})
    assert cmd[0] == "/opt/spark/bin/spark-submit"
    assert "spark.driver.bindAddress=10.0.0.1" in cmd and flag(cmd, "--deploy-mode") == "client"
    assert cmd[-len(args) :] == args
    with pytest.raises(EntrypointError, match=r"^driver: environment variable SPARK_DRIVER_BIND_ADDRESS"):
        driver_command(args, {"SPARK_HOME": "/opt/spark"})


def test_other_arguments_run_as_given() -> None:
    stage = ["latentmas", "stage", "run", "clean", "--config", "/etc/latentmas/config/clean.yaml"]
    assert command(stage, {}) == stage
    assert command(["executor-report"], {}) == ["executor-report"]
    assert command([], {}) == ["latentmas", "--help"]


def entrypoint(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "latentmas.entrypoint", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dry_run_prints_the_command_and_refusals_are_one_line() -> None:
    done = entrypoint(["executor"], {**EXECUTOR_ENV, "LATENTMAS_ENTRYPOINT_DRY_RUN": "1"})
    assert done.returncode == 0 and json.loads(done.stdout) == executor_command(EXECUTOR_ENV)
    env = {k: v for k, v in EXECUTOR_ENV.items() if k != "SPARK_DRIVER_URL"}
    done = entrypoint(["executor"], {**env, "SPARK_DRIVER_URL": ""})
    assert done.returncode == 1
    refusal = "entrypoint: executor: environment variable SPARK_DRIVER_URL is not set (Spark's driver sets it)\n"
    assert done.stderr == refusal


DRIVER_APP = """
import sys
from pyspark.sql import SparkSession
spark = SparkSession.builder.getOrCreate()
conf = spark.sparkContext.getConf()
total = spark.range(100).repartition(3).selectExpr("sum(id)").first()[0]
print("RESULT", conf.get("spark.submit.deployMode"), conf.get("spark.driver.bindAddress"), total, *sys.argv[1:])
spark.stop()
"""


def test_driver_argument_starts_a_real_driver(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(DRIVER_APP)
    env = {"SPARK_DRIVER_BIND_ADDRESS": "127.0.0.1", "PYSPARK_PYTHON": sys.executable, "SPARK_HOME": ""}
    args = ["driver", "--master", "local[1]", "--conf", "spark.ui.enabled=false", str(app), "stage", "run"]
    done = entrypoint(args, env)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT client 127.0.0.1 4950 stage run"], done.stderr[-3000:]


EXECUTOR_DRIVER = """
import json, os, sys, time
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master(sys.argv[1]).appName("entrypoint-executor")
    .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
    .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
sc = spark.sparkContext
conf = sc.getConf()
print(json.dumps({
    "driver_url": f"spark://CoarseGrainedScheduler@127.0.0.1:{conf.get('spark.driver.port')}",
    "app_id": sc.applicationId,
    "java_options": conf.get("spark.executor.extraJavaOptions", "").split(),
}), flush=True)
while sc._jsc.sc().getExecutorMemoryStatus().size() < 2:  # the driver itself plus the executor
    time.sleep(0.3)
ran_on = sc.parallelize(range(8), 4).map(lambda _: os.environ.get("SPARK_EXECUTOR_ID", "?")).distinct().collect()
print(json.dumps({"ran_on": ran_on}), flush=True)
spark.stop()
"""


def test_executor_argument_starts_an_executor_that_runs_a_drivers_tasks(tmp_path: Path) -> None:
    """The executor gets exactly the environment a Kubernetes driver gives its pods (Spark's executor
    JVM options as SPARK_JAVA_OPT_n, the driver URL, ids, cores, memory, pod IP and name)."""
    home = spark_home()
    port = free_port()
    master = ServerProcess(
        "spark-master",
        [str(home / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
         "--port", str(port), "--webui-port", str(free_port())],
        tmp_path,
        env={"SPARK_HOME": str(home)},
    )  # fmt: skip
    driver_app = tmp_path / "driver.py"
    driver_app.write_text(EXECUTOR_DRIVER)
    driver_out = tmp_path / "driver.out"
    executor: ServerProcess | None = None
    driver: subprocess.Popen[bytes] | None = None
    try:
        master.wait_until(lambda: "I have been elected leader" in master.log_path.read_text(), 120, "leadership")
        with driver_out.open("w") as out:
            driver = subprocess.Popen(
                [sys.executable, str(driver_app), f"spark://127.0.0.1:{port}"],
                stdout=out,
                stderr=(tmp_path / "driver.err").open("w"),
                env={**os.environ, "PYSPARK_PYTHON": sys.executable},
            )
        first = eventually(lambda: driver_out.read_text().splitlines()[:1], 180, "the driver's URL")
        started = json.loads(first[0])
        env = {
            **{f"SPARK_JAVA_OPT_{i}": opt for i, opt in enumerate(started["java_options"])},
            "SPARK_DRIVER_URL": started["driver_url"],
            "SPARK_EXECUTOR_ID": "7",
            "SPARK_EXECUTOR_CORES": "1",
            "SPARK_EXECUTOR_MEMORY": "512m",
            "SPARK_APPLICATION_ID": started["app_id"],
            "SPARK_EXECUTOR_POD_IP": "127.0.0.1",
            "SPARK_EXECUTOR_POD_NAME": "clean-exec-7",
            "PYSPARK_PYTHON": sys.executable,
        }
        executor = ServerProcess("executor", [sys.executable, "-m", "latentmas.entrypoint", "executor"], tmp_path, env)
        driver.wait(timeout=300)
        lines = driver_out.read_text().splitlines()
        assert driver.returncode == 0 and len(lines) == 2, (tmp_path / "driver.err").read_text()[-3000:]
        assert json.loads(lines[1]) == {"ran_on": ["7"]}, executor.log_tail()
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        if executor is not None:
            executor.stop()
        master.stop()
