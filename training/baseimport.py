"""Turning a base-model source into one local Hugging Face folder (safetensors + tokenizer) and describing it.

The base stage imports once per cycle; every later stage and the inference service load that imported copy
(see training/base.py). GGUF files are dequantized by transformers (through the `gguf` package) and written as
safetensors in the configured dtype, so nothing downstream needs GGUF support."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentmas.training.modelstore import content_digest

Progress = Callable[..., None]
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def weight_files(files: dict[str, str] | list[str]) -> list[str]:
    """The safetensors files holding the weights: `model.safetensors`, or every shard its index names."""
    names = list(files)
    if WEIGHTS in names:
        return [WEIGHTS]
    return sorted(name for name in names if name.endswith(".safetensors") and "/" not in name)


def check_model_files(files: dict[str, str] | list[str], where: str) -> None:
    """A base is a safetensors Hugging Face folder (one file or shards with their index) with a tokenizer."""
    names = set(files)
    missing = [name for name in ("config.json",) if name not in names]
    if "tokenizer.json" not in names and "tokenizer.model" not in names:
        missing.append("tokenizer.json")
    if WEIGHTS not in names and WEIGHTS_INDEX not in names:
        missing.append(WEIGHTS)
    if missing:
        raise FileNotFoundError(f"base model at {where} lacks {', '.join(missing)}")
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(f"base model at {where} contains pickle files ({', '.join(pickles)}); use safetensors")


def check_shards(folder: Path, where: str) -> None:
    """Every shard a `model.safetensors.index.json` names must be present."""
    index = folder / WEIGHTS_INDEX
    if (folder / WEIGHTS).is_file() or not index.is_file():
        return
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    absent = [name for name in shards if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(f"base model at {where} lacks shards {', '.join(absent)} named in {WEIGHTS_INDEX}")


def base_identity(files: dict[str, str]) -> str:
    """A base's identity: one digest over its whole file set (names and sha256), wherever it is stored."""
    return content_digest(files)


def legacy_weights_sha(files: dict[str, str]) -> str:
    """What earlier releases recorded as a base's identity: the sha256 of `model.safetensors` (single file)."""
    return files.get(WEIGHTS) or base_identity(files)


def same_base(recorded: str | None, files: dict[str, str]) -> bool:
    """Whether an identity recorded with an adapter names this base; reads both the current form (digest of the
    file set) and the previous one (sha256 of model.safetensors)."""
    return recorded is not None and recorded in (base_identity(files), files.get(WEIGHTS))


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes) without reading the weights."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def parameter_count(folder: Path, files: list[str]) -> int:
    """Parameters stored in the weight files (a tied output embedding is stored once, so counted once)."""
    total = 0
    for name in files:
        for tensor in safetensors_header(folder / name).values():
            count = 1
            for dim in tensor["shape"]:
                count *= int(dim)
            total += count
    return total


def describe_base(folder: Path, files: dict[str, str]) -> dict[str, Any]:
    """The facts the manifest, the registry, later stages and promotion's consistency checks rely on."""
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {
        "architectures": config.get("architectures") or [],
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "context_length": config.get("max_position_embeddings"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "parameters": parameter_count(folder, weight_files(files)),
        "identity": base_identity(files),
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }


def import_gguf(path: Path, dtype: str, out: Path, progress: Progress) -> dict[str, Any]:
    """Dequantizes a GGUF file into a safetensors folder in `dtype`; returns what was read from the file.
    Raises ValueError naming the file when transformers cannot read its architecture."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0, 2, phase="reading GGUF", file=path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"cannot import GGUF {path}: {err}") from err
    quantization = dict(getattr(model.config, "quantization_config", None) or {})
    # The weights are plain tensors now; what remains of the GGUF quantizer only blocks saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute by transformers' stubs
    setattr(model, "is_quantized", False)  # noqa: B010
    progress(1, 2, phase="writing safetensors", dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    progress(2, 2, phase="imported")
    return {"gguf_file": path.name, "gguf_quantization": quantization.get("quant_method", "gguf")}


def fetch_hub(repo: str, revision: str | None, token: str | None, out: Path) -> None:
    """Downloads a hub model's safetensors folder; any failure (no network in the cluster, unknown id, gated
    model without a token) becomes one line naming the id."""
    from huggingface_hub import constants, snapshot_download

    name = f"{repo}@{revision}" if revision else repo
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False  # latentmas.training turns hub access off everywhere else; here it is asked for
    try:
        snapshot_download(repo, revision=revision, token=token, local_dir=out, allow_patterns=HUB_PATTERNS)
    except Exception as err:  # huggingface_hub raises many unrelated types for one cause
        raise RuntimeError(f"cannot fetch hub model {name!r}: {type(err).__name__}: {err}") from err
    finally:
        constants.HF_HUB_OFFLINE = offline
