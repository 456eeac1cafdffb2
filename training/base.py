"""The `base` stage: import this cycle's base model once and describe it in `base.json`.

Sources are parsed by `latentmas.basesource` (spellings in docs/training.md):
- `bootstrap`: the registry's promoted base if it is a bootstrapped one (so promoted adapters stay comparable),
  else a BPE tokenizer and a small Llama pre-trained on this cycle's cleaned corpus;
- `s3://bucket/prefix`: an uploaded Hugging Face folder, used in place (downloaded once per machine);
- `pvc://claim/path`, `/path`: a mounted folder, used in place and guarded against later changes;
- `hf://org/name[@rev]`, and any `.gguf` file (local, s3, pvc or `pkg://`): imported — fetched or dequantized and
  written under this stage's `model/` prefix in `baseModel.dtype`.
`base.json` records the source, the file set with every sha256, the base identity (a digest of that set) and the
model facts (architecture, parameters, tokenizer, chat template, context length). Downstream stages and the
inference service call `load_base(ctx)` / `local_base(...)` to get that exact folder."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from latentmas.basesource import BaseSource, parse_base_uri
from latentmas.registry import load_registry
from latentmas.stage import StageContext, StageResult
from latentmas.store import sha256_file
from latentmas.training.baseimport import (
    check_model_files,
    check_shards,
    describe_base,
    fetch_hub,
    import_gguf,
    legacy_weights_sha,
)
from latentmas.training.modelstore import cached_folder, fetch_prefix, folder_files, upload_folder
from latentmas.training.presets import PRESETS

BASE_JSON = "base.json"
MODEL_DIR = "model/"
BOOTSTRAP_MAX_CHARS = 20_000_000
TOKEN_ENV = "HF_TOKEN"


def base_stage(ctx: StageContext) -> StageResult:
    spec = ctx.spec.base_model
    source = parse_base_uri(spec.uri)
    metrics: dict[str, Any] = {}
    if source.kind == "bootstrap":
        ref, folder, metrics = _bootstrap_or_reuse(ctx)
    elif source.gguf or source.kind == "hub":
        ref, folder, metrics = _import(ctx, source)
    elif source.kind == "s3":
        folder, files = fetch_prefix(ctx.store, source.bucket, source.location)
        check_model_files(files, spec.uri)
        ref = {"source": spec.uri, "bucket": source.bucket, "prefix": source.location, "files": files}
    else:
        folder = _mounted_folder(source)
        files = folder_files(folder)
        check_model_files(files, spec.uri)
        ref = {"source": spec.uri, "path": str(folder), "files": files}
    check_shards(folder, spec.uri)
    _check_architecture(folder)
    ref["model"] = describe_base(folder, ref["files"])
    ref["identity"] = ref["model"]["identity"]
    ctx.put_json(BASE_JSON, ref)
    outputs = [BASE_JSON]
    if ref.get("prefix", "").startswith(ctx.key(MODEL_DIR)):
        outputs += [MODEL_DIR + name for name in ref["files"]]
    summary = {k: v for k, v in ref["model"].items() if not isinstance(v, dict | list)}
    return StageResult(outputs=outputs, counts={"files": len(ref["files"])}, metrics={**metrics, **summary})


def _check_architecture(folder: Path) -> None:
    """Refuses, at the base stage, an architecture the training and serving code does not support."""
    from latentmas.training.architectures import check_architecture
    from transformers import AutoConfig

    check_architecture(AutoConfig.from_pretrained(folder))


def _mounted_folder(source: BaseSource) -> Path:
    path = source.local_path()
    if not path.is_dir():
        raise FileNotFoundError(f"baseModel.uri {source.uri!r}: {path} is not a mounted folder")
    return path


def _gguf_file(ctx: StageContext, source: BaseSource) -> Path:
    """The local path of a GGUF source (an s3 object is downloaded into the stage's work folder)."""
    if source.kind == "package":
        try:
            path = Path(str(importlib.metadata.distribution(source.distribution).locate_file(source.location)))
        except importlib.metadata.PackageNotFoundError as err:
            raise FileNotFoundError(
                f"baseModel.uri {source.uri!r}: Python distribution {source.distribution!r} is not installed"
            ) from err
    elif source.kind == "s3":
        path = ctx.workdir / "gguf" / Path(source.location).name
        ctx.store.get_file(source.bucket, source.location, path)
    else:
        path = source.local_path()
    if not path.is_file():
        raise FileNotFoundError(f"baseModel.uri {source.uri!r}: {path} is not a file")
    return path


def _import(ctx: StageContext, source: BaseSource) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Fetches or dequantizes the base into `model/` under this stage's prefix (the copy every later stage and
    the inference service load)."""
    spec = ctx.spec.base_model
    folder = ctx.workdir / "model"
    metrics: dict[str, Any]
    if source.kind == "hub":
        fetch_hub(source.location, source.revision, os.environ.get(TOKEN_ENV) or None, folder)
        metrics = {"hub_id": source.location, "hub_revision": source.revision}
    else:
        path = _gguf_file(ctx, source)
        metrics = {**import_gguf(path, spec.dtype, folder, ctx.progress), "gguf_sha256": sha256_file(path)}
    files = folder_files(folder)
    check_model_files(files, spec.uri)
    prefix = ctx.key(MODEL_DIR)
    upload_folder(ctx.store, ctx.bucket, prefix, folder)
    return {"source": spec.uri, "bucket": ctx.bucket, "prefix": prefix, "files": files}, folder, metrics


def _bootstrap_or_reuse(ctx: StageContext) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    registry = load_registry(ctx.store, ctx.bucket, ctx.config.namespace, ctx.config.stack)
    active = registry.base.active()
    if active is not None and active.metrics.get("source", "bootstrap") == "bootstrap":
        folder = cached_folder(ctx.store, ctx.bucket, active.prefix, active.files)
        ref = {"source": "bootstrap", "reused": f"registry:v{active.version}", "bucket": ctx.bucket}
        return {**ref, "prefix": active.prefix, "files": active.files}, folder, {"reused_version": active.version}
    from latentmas.jobs.splits import train_texts
    from latentmas.training.bootstrap import bootstrap

    spec = ctx.spec.base_model
    preset = PRESETS[spec.preset]
    texts = train_texts(ctx, BOOTSTRAP_MAX_CHARS)  # never the held-out documents
    folder = ctx.workdir / "model"
    metrics = bootstrap(
        texts,
        preset,
        spec.vocab_size or preset.vocab,
        spec.bootstrap_steps,
        ctx.spec.pipeline.training.seed,
        folder,
        ctx.progress,
    )
    prefix = ctx.key(MODEL_DIR)
    files = upload_folder(ctx.store, ctx.bucket, prefix, folder)
    check_model_files(files, prefix)
    return {"source": "bootstrap", "bucket": ctx.bucket, "prefix": prefix, "files": files}, folder, metrics


def read_base_ref(ctx: StageContext) -> dict[str, Any]:
    """This cycle's base.json (the base stage must have finished)."""
    ctx.read_manifest("base")
    return dict(json.loads(ctx.store.get_bytes(ctx.bucket, ctx.prefix("base") + BASE_JSON)))


def base_sha(ref: dict[str, Any]) -> str:
    """The identity recorded with adapters trained on this base (see baseimport.same_base for reading it)."""
    return str(ref.get("identity") or legacy_weights_sha(ref["files"]))


def base_facts(ref: dict[str, Any]) -> dict[str, Any]:
    """What an adapter records about the base it was trained on; promotion and serving compare it with theirs."""
    model = ref.get("model", {})
    return {"identity": base_sha(ref), "model_type": model.get("model_type"), "hidden_size": model.get("hidden_size")}


def local_base(ctx: StageContext, ref: dict[str, Any]) -> Path:
    """A local folder holding the base described by `ref` (cached download, or the mounted path)."""
    if "path" in ref:
        folder = Path(ref["path"])
        if not folder.is_dir():
            folder = parse_base_uri(ref["source"]).local_path()
        for name, digest in ref["files"].items():
            if name.endswith((".safetensors", ".json")) and sha256_file(folder / name) != digest:
                raise ValueError(f"mounted base {folder} changed since the base stage ran ({name})")
        return folder
    return cached_folder(ctx.store, ref["bucket"], ref["prefix"], ref["files"])


def load_base(ctx: StageContext) -> Path:
    """The local folder of this cycle's base model."""
    return local_base(ctx, read_base_ref(ctx))
