"""The base stage: a bootstrapped base is a loadable, untied Llama with a chat-template tokenizer; an
s3:// base is downloaded once; a mounted base is used in place and guarded against later changes."""

from __future__ import annotations

import json
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


def _upload(minio: MinioFixture, folder: Path, prefix: str) -> None:
    minio.store.ensure_bucket("models")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        minio.store.put_file("models", prefix + path.relative_to(folder).as_posix(), path)


def test_sharded_s3_base_is_one_identity_over_every_file(cycle1: Cycle, minio: MinioFixture, tmp_path: Path) -> None:
    from latentmas.training.baseimport import base_identity

    model = AutoModelForCausalLM.from_pretrained(base_folder(cycle1, minio))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(base_folder(cycle1, minio)).save_pretrained(sharded)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    _upload(minio, sharded, "sharded/")
    config = StageConfig(
        stack="sharded", cycle_id="s1", spec=stack_spec(minio, EXPERTS, base_uri="s3://models/sharded")
    )
    run_stage("base", config, minio.store)
    with stage_context("train", config, minio.store) as ctx:
        ref = json.loads(minio.store.get_bytes("artifacts", ctx.prefix("base") + "base.json"))
        assert set(shards) | {"model.safetensors.index.json", "config.json"} <= set(ref["files"])
        assert ref["identity"] == base_identity(ref["files"]) == ref["model"]["identity"]
        assert ref["model"]["parameters"] == sum(p.numel() for p in model.parameters())
        loaded = AutoModelForCausalLM.from_pretrained(load_base(ctx))
        assert loaded.config.hidden_size == 64
    minio.store.delete("models", "sharded/" + shards[0])
    broken = config.model_copy(update={"stack": "sharded-broken"})
    with pytest.raises(FileNotFoundError, match=f"lacks shards {shards[0]}"):
        run_stage("base", broken, minio.store)


def test_unsupported_architecture_fails_the_base_stage_naming_it(
    cycle1: Cycle, minio: MinioFixture, tmp_path: Path
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=4096)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_folder(cycle1, minio)).save_pretrained(folder)
    _upload(minio, folder, "gpt2/")
    config = StageConfig(stack="gpt2", cycle_id="g1", spec=stack_spec(minio, EXPERTS, base_uri="s3://models/gpt2"))
    with pytest.raises(
        ValueError, match=r"architecture 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"
    ):
        run_stage("base", config, minio.store)


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        ("{tmp}/missing.gguf", FileNotFoundError, "is not a file"),
        ("{tmp}/garbage.gguf", ValueError, "cannot import GGUF"),
        ("pkg://no-such-distribution/x/model.gguf", FileNotFoundError, "'no-such-distribution' is not installed"),
        ("s3://models/none/model.gguf", Exception, "model.gguf"),
        (
            "hf://latentmas-tests/no-network@main",
            RuntimeError,
            "cannot fetch hub model 'latentmas-tests/no-network@main'",
        ),
    ],
)
def test_unreadable_gguf_sources_fail_with_the_uri_and_reason(
    minio: MinioFixture, tmp_path: Path, uri: str, error: type[Exception], message: str
) -> None:
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    minio.store.ensure_bucket("models")
    spec = stack_spec(minio, EXPERTS, base_uri=uri.format(tmp=tmp_path))
    config = StageConfig(stack="badgguf", cycle_id=f"b{abs(hash(uri)) % 1000}", spec=spec)
    with pytest.raises(error, match=message):
        run_stage("base", config, minio.store)
    with stage_context("base", config, minio.store) as ctx:
        assert not minio.store.exists("artifacts", ctx.key("_manifest.json")), "a failed base stage leaves no manifest"
