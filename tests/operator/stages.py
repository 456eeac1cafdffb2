"""Plays the part of the stage containers, which kwok does not run: when a stage Job's Pod has
completed, write that stage's `_manifest.json` to MinIO exactly where the stage would, using the
StageConfig the operator rendered into the cycle's ConfigMap (and, for promote, a registry.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from latentmas.cycle import StageRun, raw_digest, upstream
from latentmas.operator import kube, names
from latentmas.registry import ArtifactEntry, ArtifactVersion, load_registry, save_registry
from latentmas.stage import MANIFEST, StageConfig, StageContext
from latentmas.store import ObjectStore


@dataclass
class StageSimulator:
    api: client.ApiClient
    store: ObjectStore
    namespace: str
    stack: str
    withhold: set[str] = field(default_factory=set)
    written: list[tuple[str, str]] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)

    def jobs(self) -> list[dict[str, Any]]:
        selector = f"{names.LABEL_STACK}={self.stack},{names.COMPONENT}=stage"
        return kube.list_objects(self.api, "Job", self.namespace, selector)

    def config(self, cycle: str, run_id: str) -> StageConfig:
        configmap = kube.get(self.api, "ConfigMap", self.namespace, names.cycle_configmap(self.stack, cycle))
        assert configmap is not None, f"cycle {cycle} has no stage ConfigMap"
        return StageConfig.model_validate(yaml.safe_load(configmap["data"][f"{run_id}.yaml"]))

    def step(self) -> int:
        """Writes manifests for every newly completed stage Job; returns how many it wrote."""
        count = 0
        for job in self.jobs():
            labels = job["metadata"]["labels"]
            key = (labels[names.LABEL_CYCLE], labels[names.LABEL_RUN])
            if key not in self.seen:
                self.seen.append(key)
                self._check_order(key, labels[names.LABEL_STAGE])
            done = (job.get("status") or {}).get("succeeded")
            if not done or key in self.written or labels[names.LABEL_STAGE] in self.withhold:
                continue
            self.write_manifest(*key)
            count += 1
        return count

    def _check_order(self, key: tuple[str, str], stage: str) -> None:
        cycle, run_id = key
        config = self.config(cycle, run_id)
        run = StageRun(stage, config.expert)
        missing = [u.id for u in upstream(run, config.spec) if (cycle, u.id) not in self.written]
        if missing:
            self.order_violations.append(f"{run_id} started before {missing} finished")

    def write_manifest(self, cycle: str, run_id: str) -> None:
        config = self.config(cycle, run_id)
        stage = run_id.split("-", 1)[0]
        context = StageContext(stage, config, self.store, Path("."))
        context.store.ensure_bucket(context.bucket)
        if stage == "promote":
            self._promote(config, cycle)
        now = datetime.now(UTC).isoformat()
        context.put_json(
            MANIFEST,
            {
                "stage": stage,
                "namespace": config.namespace,
                "stack": config.stack,
                "cycle": cycle,
                "expert": config.expert,
                "startedAt": now,
                "finishedAt": now,
                "durationSeconds": 0.0,
                "outputs": [],
                "counts": {},
                "metrics": self._metrics(stage, config),
                "versions": {},
            },
        )
        self.written.append((cycle, run_id))

    def _metrics(self, stage: str, config: StageConfig) -> dict[str, Any]:
        """The clean stage records the digest of the raw listing it cleaned (keys and ETags)."""
        if stage != "clean":
            return {}
        storage = config.spec.storage
        listing = self.store.list(storage.raw_bucket, config.spec.pipeline.cleaning.raw_prefix)
        return {"rawDigest": raw_digest((o.key, o.etag) for o in listing)}

    def _promote(self, config: StageConfig, cycle: str) -> None:
        bucket = config.spec.storage.artifacts_bucket
        registry = load_registry(self.store, bucket, config.namespace, config.stack)
        entries = [registry.router, registry.index]
        for expert in config.spec.experts:
            registry.experts.setdefault(expert.name, ArtifactEntry())
            entries.append(registry.experts[expert.name])
        for entry in entries:
            version = entry.next_version()
            entry.history.append(ArtifactVersion(version=version, prefix=f"v{version}/", files={}, cycle=cycle))
            entry.current = version
        save_registry(self.store, bucket, config.namespace, config.stack, registry)
