"""Trainer checkpoints mirrored to object storage, so a preempted training Job resumes where it stopped.

A checkpoint folder is uploaded file by file, then `latest.json` (step + sha256 per file) is written as
its commit marker; older checkpoints are deleted only after that. A restore downloads and verifies the
files named by `latest.json`, so a half-uploaded checkpoint is never used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latentmas.store import ObjectStore, delete_prefix
from latentmas.training.modelstore import download_verified, upload_folder
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

LATEST = "latest.json"


class CheckpointMirror(TrainerCallback):
    """Uploads each checkpoint the Trainer saves under `prefix` and moves the `latest.json` pointer."""

    def __init__(self, store: ObjectStore, bucket: str, prefix: str) -> None:
        self.store, self.bucket, self.prefix = store, bucket, prefix

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        name = f"checkpoint-{state.global_step}"
        folder = Path(str(args.output_dir)) / name
        files = upload_folder(self.store, self.bucket, f"{self.prefix}{name}/", folder)
        previous = latest(self.store, self.bucket, self.prefix)
        pointer = {"step": state.global_step, "name": name, "files": files}
        self.store.put_bytes(self.bucket, self.prefix + LATEST, json.dumps(pointer).encode())
        if previous and previous["name"] != name:
            delete_prefix(self.store, self.bucket, f"{self.prefix}{previous['name']}/")


def latest(store: ObjectStore, bucket: str, prefix: str) -> dict[str, Any] | None:
    """The committed checkpoint pointer, or None before the first checkpoint."""
    if not store.exists(bucket, prefix + LATEST):
        return None
    return dict(json.loads(store.get_bytes(bucket, prefix + LATEST)))


def restore(store: ObjectStore, bucket: str, prefix: str, output_dir: Path) -> tuple[Path, int] | None:
    """Downloads the latest checkpoint into `output_dir`; returns (folder, step) or None."""
    pointer = latest(store, bucket, prefix)
    if pointer is None:
        return None
    folder = output_dir / pointer["name"]
    download_verified(store, bucket, f"{prefix}{pointer['name']}/", pointer["files"], folder)
    return folder, int(pointer["step"])
