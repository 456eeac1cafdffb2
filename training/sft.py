"""The `train` stage: one LoRA expert by supervised fine-tuning (trl SFTTrainer + a peft LoraConfig)
on its domain's chat data, with checkpoints mirrored to object storage so a killed Job resumes.

Writes `adapter/` (adapter_config.json + adapter_model.safetensors, never pickle) and `metrics.json`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from latentmas.chat import encode_conversation
from latentmas.spec import ExpertSpec, LatentMASStackSpec, LoraSpec
from latentmas.stage import StageContext, StageResult, skipped
from latentmas.training.architectures import discover_target_modules
from latentmas.training.base import base_facts, base_sha, load_base, read_base_ref
from latentmas.training.checkpoints import CheckpointMirror, restore
from latentmas.training.context import serving_layout
from latentmas.training.data import read_sft
from latentmas.training.distributed import World, per_rank_batch
from latentmas.training.modelstore import folder_files, upload_folder
from latentmas.training.skips import skipped_experts
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback

ADAPTER_DIR = "adapter/"
METRICS = "metrics.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def expert_spec(spec: LatentMASStackSpec, name: str | None) -> ExpertSpec:
    """The expert a per-expert stage run is for."""
    if name is None:
        raise ValueError("the train stage runs per expert: set `expert` in the stage config")
    for expert in spec.experts:
        if expert.name == name:
            return expert
    raise KeyError(f"expert {name!r} is not in the spec (experts: {', '.join(e.name for e in spec.experts)})")


def lora_config(lora: LoraSpec, discovered: list[str]) -> LoraConfig:
    """The spec's LoRA settings; its target modules, else those `discovered` in the base."""
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules or discovered),
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_arguments(spec: LatentMASStackSpec, expert: ExpertSpec, output_dir: str, gpu: bool) -> Any:
    """SFTConfig from the spec for pre-tokenized data (labels already mask everything but the answers),
    bf16 and gradient checkpointing only on a GPU, fixed seeds, checkpoints every `saveSteps`."""
    from trl import SFTConfig

    training = spec.pipeline.training
    max_steps = expert.max_steps or training.max_steps
    world = World.from_env()
    return SFTConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        # The global batch is the spec's whatever the number of processes (torchrun: `distributed`).
        per_device_train_batch_size=per_rank_batch(training.batch_size, world.size),
        average_tokens_across_devices=True,
        ddp_backend=None if gpu or world.size == 1 else "gloo",
        learning_rate=expert.learning_rate or training.learning_rate,
        max_length=training.max_seq_length,
        bf16=gpu,
        activation_checkpointing=gpu,
        use_cpu=not gpu,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=max(1, max_steps // 10),
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=1,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
    )


class ProgressReporter(TrainerCallback):
    """Step, loss, tokens/s and ETA into the stage's progress record at every logging step."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.first_step: int | None = None
        self.first_tokens = 0
        self.started = time.monotonic()
        self.last_loss: float | None = None
        self.tokens_per_s = 0.0

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.first_step is None:
            self.first_step, self.first_tokens = state.global_step, int(state.num_input_tokens_seen)
            self.started = time.monotonic()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kw: Any
    ) -> None:
        if not logs or "loss" not in logs:
            return
        self.last_loss = float(logs["loss"])
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = state.global_step - (self.first_step or 0)
        self.tokens_per_s = (int(state.num_input_tokens_seen) - self.first_tokens) / elapsed
        eta = elapsed / max(done, 1) * (state.max_steps - state.global_step)
        self.ctx.progress(
            state.global_step,
            state.max_steps,
            loss=round(self.last_loss, 4),
            tokens_per_s=round(self.tokens_per_s, 1),
            eta_s=round(eta, 1),
        )


def sft_trainer(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    args: Any,
    lora: LoraSpec,
    callbacks: Sequence[TrainerCallback] = (),
) -> Any:
    """An SFTTrainer for a LoRA on `model` (targets from the spec, else discovered in the model), fed
    conversations rendered in the base's own chat template with labels on the answer tokens only."""
    from datasets import Dataset
    from trl import SFTTrainer

    peft_config = lora_config(lora, discover_target_modules(model))
    examples = [encode_conversation(tokenizer, messages, args.max_length) for messages in conversations]
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": ids, "labels": labels} for ids, labels in examples]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def save_adapter(model: PeftModel, folder: Path, base_source: str) -> None:
    """Writes exactly ADAPTER_FILES (safetensors; embeddings never saved, tied or not) into `folder`."""
    model.peft_config["default"].base_model_name_or_path = base_source
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"adapter in {folder} lacks {', '.join(missing)}")
    for extra in set(folder_files(folder)) - set(ADAPTER_FILES):
        (folder / extra).unlink()


def train_stage(ctx: StageContext) -> StageResult:
    expert = expert_spec(ctx.spec, ctx.config.expert)
    reason = skipped_experts(ctx).get(expert.name)
    if reason is not None:
        return skipped(reason)
    return train_expert(ctx, expert)


def train_expert(ctx: StageContext, expert: ExpertSpec, callbacks: Sequence[TrainerCallback] = ()) -> StageResult:
    """Trains (or resumes) one expert; `callbacks` lets tests interrupt a run part-way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpu = torch.cuda.is_available()
    base_ref = read_base_ref(ctx)
    base_dir = load_base(ctx)
    rows = read_sft(ctx, expert.domain, "train")
    dtype = getattr(torch, ctx.spec.base_model.dtype) if gpu else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    output_dir = ctx.workdir / "run"
    checkpoint_prefix = ctx.key("checkpoints/")
    resumed = restore(ctx.store, ctx.bucket, checkpoint_prefix, output_dir)
    reporter = ProgressReporter(ctx)
    trainer = sft_trainer(
        model,
        tokenizer,
        serving_layout(ctx, expert.domain, rows, oracle=None),
        sft_arguments(ctx.spec, expert, str(output_dir), gpu),
        expert.lora,
        [reporter, CheckpointMirror(ctx.store, ctx.bucket, checkpoint_prefix), *callbacks],
    )
    result = trainer.train(resume_from_checkpoint=str(resumed[0]) if resumed else None)
    adapter_dir = ctx.workdir / "adapter"
    trained = cast(PeftModel, trainer.model)
    save_adapter(trained, adapter_dir, base_ref.get("source", ""))
    targets = sorted(cast(LoraConfig, trained.peft_config["default"]).target_modules or [])
    files = upload_folder(ctx.store, ctx.bucket, ctx.key(ADAPTER_DIR), adapter_dir)
    metrics: dict[str, Any] = {
        "expert": expert.name,
        "domain": expert.domain,
        "train_examples": len(rows),
        "steps": int(trainer.state.global_step),
        "resumed_from_step": resumed[1] if resumed else 0,
        "steps_this_run": int(trainer.state.global_step) - (reporter.first_step or 0),
        "train_loss": round(float(result.training_loss), 4),
        "last_loss": reporter.last_loss,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_s": round(reporter.tokens_per_s, 1),
        "base_sha256": base_sha(base_ref),
        "base": base_facts(base_ref),
        "lora": {**expert.lora.model_dump(by_alias=True), "targetModules": targets},
    }
    ctx.put_json(METRICS, metrics)
    return StageResult(
        outputs=[ADAPTER_DIR + name for name in files] + [METRICS],
        counts={"examples": len(rows), "steps": metrics["steps"]},
        metrics=metrics,
    )
