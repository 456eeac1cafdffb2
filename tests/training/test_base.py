"""The base stage: a bootstrapped base is a loadable, untied Llama with a chat-template tokenizer; an
s3:// base is downloaded once; a mounted base is used in place and guarded against later changes."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from latentmas.stage import StageConfig, run_stage, stage_context
from latentmas.testing.fixtures import MinioFixture
from latentmas.training.base import load_base
from latentmas.training.modelstore import cached_folder, fetch_prefix
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.conftest import EXPERTS, Cycle, stack_spec

pytestmark = pytest.mark.training


def base_folder(cycle: Cycle, minio: MinioFixture) -> Path:
    ref = cycle.read_json("base", "base.json")
    return cached_folder(minio.store, ref["bucket"], ref["prefix"], ref["files"])


def test_bootstrapped_base_is_a_loadable_untied_llama(cycle1: Cycle, minio: MinioFixture) -> None:
    ref = cycle1.read_json("base", "base.json")
    assert ref["source"] == "bootstrap"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(ref["files"])
    assert not [name for name in ref["files"] if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    folder = base_folder(cycle1, minio)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings is False
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert model.config.vocab_size == len(tokenizer) and model.config.hidden_size == 64
    metrics = cycle1.manifests["base"]["metrics"]
    assert metrics["pretrain_loss"] < 0.5 * math.log(len(tokenizer)), "pre-training did not learn the corpus"
    chat = [{"role": "user", "content": "What is the coupon?"}, {"role": "assistant", "content": "Four percent."}]
    encoded: dict[str, list[int]] = dict(
        tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    )
    answer = [t for t, keep in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(answer) == "Four percent.<|eos|>"
    prompt = dict(
        tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_s3_base_is_downloaded_once(cycle1: Cycle, minio: MinioFixture) -> None:
    ref = cycle1.read_json("base", "base.json")
    first, files = fetch_prefix(minio.store, "artifacts", ref["prefix"])
    assert files == ref["files"]
    marker = (first / ".complete").stat().st_mtime_ns
    again, _ = fetch_prefix(minio.store, "artifacts", ref["prefix"])
    assert again == first and (again / ".complete").stat().st_mtime_ns == marker


def test_mounted_base_is_used_in_place_and_guarded(cycle1: Cycle, minio: MinioFixture, tmp_path: Path) -> None:
    mounted = tmp_path / "pvc" / "base"
    shutil.copytree(base_folder(cycle1, minio), mounted, ignore=shutil.ignore_patterns(".*"))
    config = StageConfig(stack="mounted", cycle_id="m1", spec=stack_spec(minio, EXPERTS, base_uri=f"pvc:{mounted}"))
    manifest = run_stage("base", config, minio.store)
    assert manifest["metrics"]["hidden_size"] == 64 and manifest["outputs"][0]["key"] == "base.json"
    with stage_context("train", config, minio.store) as ctx:
        assert load_base(ctx) == mounted
        (mounted / "model.safetensors").write_bytes(b"corrupted")
        with pytest.raises(ValueError, match="changed since the base stage ran"):
            load_base(ctx)
    missing = StageConfig(stack="mounted", cycle_id="m2", spec=stack_spec(minio, EXPERTS, base_uri="pvc:/nope/base"))
    with pytest.raises(FileNotFoundError, match="is not a mounted folder"):
        run_stage("base", missing, minio.store)
