"""The `base` stage: decide which base model this cycle trains on and describe it in `base.json`.

Sources, by `baseModel.uri`:
- `s3://bucket/prefix`: an uploaded Hugging Face folder, downloaded once into the local cache;
- `pvc:/path` or `/path`: a mounted folder (every training pod mounts the same volume);
- `bootstrap`: the registry's promoted base if there is one (so promoted adapters stay comparable),
  else a BPE tokenizer and a small Llama pre-trained on this cycle's cleaned corpus.
Downstream stages call `load_base(ctx)` to get a local folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latentmas.registry import load_registry
from latentmas.stage import StageContext, StageResult
from latentmas.store import sha256_file
from latentmas.training.modelstore import cached_folder, fetch_prefix, folder_files, parse_s3_uri, upload_folder
from latentmas.training.presets import PRESETS

BASE_JSON = "base.json"
MODEL_DIR = "model/"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
BOOTSTRAP_MAX_CHARS = 20_000_000


def check_model_files(files: dict[str, str] | list[str], where: str) -> None:
    """A base must be a safetensors Hugging Face folder with a tokenizer."""
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise FileNotFoundError(f"base model at {where} lacks {', '.join(missing)}")
    pickles = [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    if pickles:
        raise ValueError(f"base model at {where} contains pickle files ({', '.join(pickles)}); use safetensors")


def model_summary(folder: Path) -> dict[str, Any]:
    """The architecture facts later stages and the promotion shape check rely on."""
    config = json.loads((folder / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings")
    return {k: config.get(k) for k in keys}


def base_stage(ctx: StageContext) -> StageResult:
    spec = ctx.spec.base_model
    uri = spec.uri
    metrics: dict[str, Any] = {}
    if uri == "bootstrap":
        ref, folder, metrics = _bootstrap_or_reuse(ctx)
    elif uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        folder, files = fetch_prefix(ctx.store, bucket, prefix)
        check_model_files(files, uri)
        ref = {"source": uri, "bucket": bucket, "prefix": prefix, "files": files}
    else:
        folder = Path(uri.removeprefix("pvc:"))
        if not folder.is_dir():
            raise FileNotFoundError(f"baseModel.uri {uri!r}: {folder} is not a mounted folder")
        files = folder_files(folder)
        check_model_files(files, uri)
        ref = {"source": uri, "path": str(folder), "files": files}
    ref["model"] = model_summary(folder)
    ctx.put_json(BASE_JSON, ref)
    outputs = [BASE_JSON]
    if ref.get("prefix", "").startswith(ctx.key(MODEL_DIR)):
        outputs += [MODEL_DIR + name for name in ref["files"]]
    return StageResult(outputs=outputs, counts={"files": len(ref["files"])}, metrics={**metrics, **ref["model"]})


def _bootstrap_or_reuse(ctx: StageContext) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    registry = load_registry(ctx.store, ctx.bucket, ctx.config.namespace, ctx.config.stack)
    active = registry.base.active()
    if active is not None:
        folder = cached_folder(ctx.store, ctx.bucket, active.prefix, active.files)
        ref = {"source": f"registry:v{active.version}", "bucket": ctx.bucket, "prefix": active.prefix}
        return {**ref, "files": active.files}, folder, {"reused_version": active.version}
    from latentmas.training.bootstrap import bootstrap
    from latentmas.training.data import read_corpus_texts

    spec = ctx.spec.base_model
    preset = PRESETS[spec.preset]
    texts = read_corpus_texts(ctx, BOOTSTRAP_MAX_CHARS)
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


def local_base(ctx: StageContext, ref: dict[str, Any]) -> Path:
    """A local folder holding the base described by `ref` (cached download, or the mounted path)."""
    if "path" in ref:
        folder = Path(ref["path"])
        for name in REQUIRED:
            if sha256_file(folder / name) != ref["files"][name]:
                raise ValueError(f"mounted base {folder} changed since the base stage ran ({name})")
        return folder
    return cached_folder(ctx.store, ref["bucket"], ref["prefix"], ref["files"])


def load_base(ctx: StageContext) -> Path:
    """The local folder of this cycle's base model."""
    return local_base(ctx, read_base_ref(ctx))
