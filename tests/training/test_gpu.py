"""On a CUDA GPU: the training stage's LoRA SFT (bf16, activation checkpointing) runs and needs less
GPU memory than trl's defaults (full fine-tuning) on the same model and data. Skipped without a GPU."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from bench.training import chat_rows, make_base, run_variant

pytestmark = [pytest.mark.training, pytest.mark.gpu]


def test_stage_lora_sft_on_gpu_beats_trl_defaults_on_memory(tmp_path: Path) -> None:
    rows = chat_rows(400, seed=0)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    make_base(tmp_path / "base", "small", rows)
    results = {}
    for variant in ("stage", "trl-defaults"):
        results[variant] = run_variant(variant, tmp_path / "base", data, steps=12, warmup=4, batch=8, threads=1)
        gc.collect()
        torch.cuda.empty_cache()
    stage, default = results["stage"], results["trl-defaults"]
    assert stage["trainable_params"] < 0.1 * default["trainable_params"]
    assert stage["peak_mib"] < default["peak_mib"]
    assert stage["tokens_per_s"] > 0 and default["tokens_per_s"] > 0
