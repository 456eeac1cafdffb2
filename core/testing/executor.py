"""A test-only kubelet for stage Jobs: kwok fakes their Pods, this runs each Pod's real container
command in a local process (config from the Pod's ConfigMap volume, env from its Secret references),
then completes the Pod with that process's exit code. So the real operator, the real stages and the
real registry run together on the test cluster."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException
from latentmas.testing.controlplane import MANUAL_COMPLETION_ANNOTATION, complete_pod


def _local_command(command: list[str], mounts: dict[str, Path]) -> list[str]:
    """The container's command with mounted paths mapped to local files and `latentmas` to this Python."""
    local = []
    for arg in command:
        for mount_path in sorted(mounts, key=len, reverse=True):
            if arg.startswith(mount_path + "/"):
                arg = str(mounts[mount_path] / arg.removeprefix(mount_path + "/"))
                break
        local.append(arg)
    if local and local[0] == "latentmas":
        local = [sys.executable, "-m", "latentmas", *local[1:]]
    return local


@dataclass
class StageExecutor:
    """Polls a namespace for Running pods that ask for manual completion and runs them, one at a time."""

    core: Any
    namespace: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> StageExecutor:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                pods = self.core.list_namespaced_pod(self.namespace).items
            except Exception:
                continue
            for pod in pods:
                annotations = pod.metadata.annotations or {}
                if (
                    MANUAL_COMPLETION_ANNOTATION in annotations
                    and pod.status.phase == "Running"
                    and pod.metadata.name not in self.ran
                    and self._volumes_ready(pod)
                ):
                    self.ran.append(pod.metadata.name)
                    try:
                        code = self._execute(pod)
                        self._complete(pod.metadata.name, code)
                    except Exception as err:  # recorded for the test, and the loop keeps serving other pods
                        self.failures.append(f"{pod.metadata.name}: executor: {type(err).__name__}: {err}")

    def _complete(self, name: str, code: int) -> None:
        """Reports the container's exit like a kubelet; a pod deleted meanwhile (the operator cleans up the Jobs of
        a cycle whose manifests already say it finished) has nothing left to report."""
        try:
            complete_pod(self.core, name, self.namespace, exit_code=code)
        except ApiException as err:
            if err.status != 404:
                raise

    def _volumes_ready(self, pod: Any) -> bool:
        """Like a kubelet, start a container only once the ConfigMaps it mounts exist (the operator may create a
        cycle's ConfigMap after its first Job; kwok reports the pod Running regardless)."""
        for volume in pod.spec.volumes or []:
            if volume.config_map is None:
                continue
            try:
                self.core.read_namespaced_config_map(volume.config_map.name, self.namespace)
            except Exception:
                return False
        return True

    def _env(self, container: Any) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        for var in container.env or []:
            if var.value is not None:
                env[var.name] = var.value
            elif var.value_from and var.value_from.secret_key_ref:
                ref = var.value_from.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, self.namespace)
                env[var.name] = base64.b64decode(secret.data[ref.key]).decode()
        return env

    def _execute(self, pod: Any) -> int:
        container = pod.spec.containers[0]
        folder = Path(tempfile.mkdtemp(prefix=f"{pod.metadata.name}-", dir=self.workdir))
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts: dict[str, Path] = {}
        for mount in container.volume_mounts or []:
            volume = volumes.get(mount.name)
            target = folder / mount.name
            target.mkdir(parents=True, exist_ok=True)
            if volume is not None and volume.config_map is not None:
                data = self.core.read_namespaced_config_map(volume.config_map.name, self.namespace).data or {}
                for key, value in data.items():
                    (target / key).write_text(value)
            mounts[mount.mount_path.rstrip("/")] = target
        command = _local_command([*(container.command or []), *(container.args or [])], mounts)
        done = subprocess.run(
            command, env=self._env(container), capture_output=True, text=True, timeout=900, cwd=folder
        )
        (folder / "output.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            self.failures.append(f"{pod.metadata.name}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
        return done.returncode
