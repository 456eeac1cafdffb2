"""Recipe vs execution: which spec fields change which stages' artifacts (DESIGN §4).

Every leaf field of every spec model carries a marker here: the stages whose artifacts it changes (the
*recipe*), or `EXECUTION` when it only changes how or where a stage runs (images, resources, retries,
placement, serving knobs). A field that is a model, or a list/dict of models, is not marked itself: its
own fields are. `tests/core/test_recipe.py` fails on an unmarked or stale entry, so a new spec field
cannot silently join or leave the retrain trigger.

Uses: a stage's manifest records the hash of its recipe slice (plus its inputs' identities and the
stack uid) and `run_stage` reuses a finished stage only on an exact match; the operator's spec-change
trigger compares the recipe hash of the built artifacts with the current one, so operational edits
never retrain and a recipe that differs from what was built always does."""

from __future__ import annotations

import hashlib
import json
import types
import typing
from typing import Any

from latentmas.spec import LatentMASStackSpec
from pydantic import BaseModel

EXECUTION: tuple[str, ...] = ()
PER_EXPERT_LISTS = {("LatentMASStackSpec", "experts")}

_EXPERT_STAGES = ("synth", "train", "router", "evaluate", "promote")

# model class name -> field name -> stages whose artifacts the field changes.
MARKERS: dict[str, dict[str, tuple[str, ...]]] = {
    "SecretKeyRef": {"name": EXECUTION, "access_key_key": EXECUTION, "secret_key_key": EXECUTION},
    "StorageSpec": {
        "endpoint": EXECUTION,
        "secure": EXECUTION,
        "region": EXECUTION,
        "raw_bucket": ("clean",),
        "artifacts_bucket": EXECUTION,
        "artifact_policy": EXECUTION,
    },
    "Resources": {"cpu": EXECUTION, "memory": EXECUTION, "gpu": EXECUTION, "gpu_resource_name": EXECUTION},
    "StageRetry": {
        "retries": EXECUTION,
        "backoff_seconds": EXECUTION,
        "deadline_seconds": EXECUTION,
        "node_selector": EXECUTION,
    },
    "BaseModelSpec": {
        "uri": ("base",),
        "dtype": ("base", "train"),
        "preset": ("base",),
        "bootstrap_steps": ("base",),
        "vocab_size": ("base",),
        "token_secret_ref": EXECUTION,
    },
    "LoraSpec": {"rank": ("train",), "alpha": ("train",), "dropout": ("train",), "target_modules": ("train",)},
    "ExpertSpec": {
        "name": _EXPERT_STAGES,
        "domain": _EXPERT_STAGES,
        "max_steps": ("train",),
        "learning_rate": ("train",),
    },
    "CleaningSpec": {
        "engine": ("clean",),
        "raw_prefix": ("clean",),
        "spark_executors": EXECUTION,
        "min_chars": ("clean",),
        "max_symbol_ratio": ("clean",),
        "near_duplicate_threshold": ("clean",),
        "chunk_chars": ("clean",),
        "chunk_overlap": ("clean",),
        "redact_pii": ("clean",),
    },
    "QuantSpec": {
        "polynomial_degree": ("quant",),
        "correlation_threshold": ("quant",),
        "drift_reference": ("quant",),
        "drift_action": ("quant",),
        "psi_threshold": ("quant",),
        "ks_threshold": ("quant",),
        "block_size": EXECUTION,
        "write_features": ("quant",),
    },
    "SynthesisSpec": {
        "examples_per_chunk": ("synth",),
        "holdout_fraction": ("synth", "index", "base"),
        "split_jaccard": ("synth", "index", "base"),
        "max_group_documents": ("synth", "index", "base"),
        "min_heldout_documents": ("synth",),
        "endpoint": ("synth",),
        "model": ("synth",),
        "min_quality": ("synth",),
        "max_answer_chars": ("synth",),
        "seed": ("synth", "index", "base"),
    },
    "RagSpec": {
        "embedding_model": ("index",),
        "index_type": ("index",),
        "hnsw_threshold": ("index",),
        "bm25": ("index",),
        "reranker": ("index",),
        "fusion": ("index",),
        "quality_boost": ("index",),
        "eval_queries": ("index",),
        "gpu": EXECUTION,
    },
    "TrainingSpec": {
        "image": EXECUTION,
        "max_steps": ("train",),
        "learning_rate": ("train",),
        "batch_size": ("train",),
        "max_seq_length": ("train", "evaluate"),
        "router_mode": EXECUTION,  # unused: evaluation scores inference.routingMode
        "router_feature_layer": ("router",),
        "context_passages": ("train", "evaluate"),
        "seed": ("base", "train", "router"),
        "save_steps": EXECUTION,
        "router_hidden": ("router",),
        "router_epochs": ("router",),
        "router_balance_weight": ("router",),
        "nodes": EXECUTION,
    },
    "EvaluationSpec": {
        "min_improvement": ("promote",),
        "gate": ("promote",),
        "min_router_accuracy": ("promote",),
        "max_heldout_examples": ("router", "evaluate"),
        "heldout_document_tokens": ("evaluate",),
    },
    "InferenceSpec": {
        "enabled": EXECUTION,
        "image": EXECUTION,
        "replicas": EXECUTION,
        # Evaluation scores the served routing, so the routing fields are part of its recipe.
        "routing_mode": ("evaluate",),
        "router_temperature": ("router", "evaluate"),
        "confidence_threshold": ("evaluate",),
        "adapter_slots": EXECUTION,
        "cpu_cache_adapters": EXECUTION,
        "max_lora_rank": EXECUTION,
        "max_batch_size": EXECUTION,
        "kv_budget_tokens": EXECUTION,
        "max_concurrent_requests": EXECUTION,
        "max_prompt_tokens": EXECUTION,
        "max_tokens": EXECUTION,
        "reload_poll_seconds": EXECUTION,
        "port": EXECUTION,
        "agents_pipeline": EXECUTION,
        "auth_secret_ref": EXECUTION,
    },
    "AutoscalingSpec": {
        "enabled": EXECUTION,
        "min_replicas": EXECUTION,
        "max_replicas": EXECUTION,
        "target_cpu_utilization": EXECUTION,
    },
    "AgentsSpec": {
        "latent_steps": EXECUTION,
        "mode": EXECUTION,
        "keep_cache": EXECUTION,
        "positions": EXECUTION,
        "realign": EXECUTION,
        "realign_lambda": EXECUTION,
    },
    # Agent prompts change served answers (and so the semantic-cache scope) but no stage's artifacts: the
    # agent pipelines run only in serving (SFT data, the router and evaluation use the single-agent layout
    # of latentmas.prompts), so editing a template must not retrain anything.
    "AgentPromptsSpec": {"system": EXECUTION, "answer_format": EXECUTION},
    **{
        templates: dict.fromkeys(
            (
                "planner",
                "critic",
                "refiner",
                "judger",
                "math_agent",
                "science_agent",
                "code_agent",
                "summarizer",
            ),
            EXECUTION,
        )
        for templates in ("LatentPromptTemplates", "TextPromptTemplates")
    },
    "ScheduleSpec": {
        "cron": EXECUTION,
        "time_zone": EXECUTION,
        "suspend": EXECUTION,
        "concurrency_policy": EXECUTION,
        "starting_deadline_seconds": EXECUTION,
        "successful_jobs_history_limit": EXECUTION,
        "failed_jobs_history_limit": EXECUTION,
    },
    "Toleration": {"key": EXECUTION, "operator": EXECUTION, "value": EXECUTION, "effect": EXECUTION},
    "LatentMASStackSpec": {
        "node_selector": EXECUTION,
        "stage_pod_annotations": EXECUTION,
        "priority_class_name": EXECUTION,
        "image_pull_secrets": EXECUTION,
    },
}


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (directly, optionally, or as list/dict items); None for a leaf field."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, list, dict):
        for arg in typing.get_args(annotation):
            found = nested_model(arg)
            if found is not None:
                return found
    return None


def _slice(model: BaseModel, stage: str | None, expert: str | None) -> dict[str, Any]:
    """The fields of `model` in `stage`'s recipe (any stage's when None), as wire-format JSON."""
    cls = type(model)
    out: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        value = getattr(model, name)
        alias = info.alias or name
        if nested_model(info.annotation) is None:
            marker = MARKERS[cls.__name__][name]
            if marker and (stage is None or stage in marker):
                out[alias] = value
            continue
        if value is None:
            continue
        if isinstance(value, BaseModel):
            sub = _slice(value, stage, expert)
            if sub:
                out[alias] = sub
        elif isinstance(value, list):
            items = value
            if expert is not None and (cls.__name__, name) in PER_EXPERT_LISTS:
                items = [item for item in value if getattr(item, "name", None) == expert]
            subs = [_slice(item, stage, expert) for item in items]
            if any(subs):
                out[alias] = subs
        elif isinstance(value, dict):
            subs_by_key = {key: _slice(item, stage, expert) for key, item in sorted(value.items())}
            if any(subs_by_key.values()):
                out[alias] = subs_by_key
    return out


def recipe_slice(spec: LatentMASStackSpec, stage: str | None = None, expert: str | None = None) -> dict[str, Any]:
    """What `stage` (for per-expert runs: of `expert` only) builds from; every stage's when `stage` is None."""
    return _slice(spec, stage, expert)


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_hash(spec: LatentMASStackSpec, stage: str | None = None, expert: str | None = None) -> str:
    """Short hash of `recipe_slice`: equal hashes mean equal artifacts are wanted."""
    return digest(recipe_slice(spec, stage, expert))
