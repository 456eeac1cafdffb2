"""The `evaluate` stage: on each expert's held-out data, the answer loss and perplexity of the base, the
candidate expert, the router-mixed team, and the currently promoted version of that expert (when it was
trained on the same base). Writes `evaluation.json`, which the promotion gate reads. Skipped experts
(no data this cycle) appear as `{"skipped": true, "reason": ...}`; when the router run was skipped,
`router` says so and no mixed score is computed; with no expert left the run itself is skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import torch
from latentmas.chat import pad_token_id
from latentmas.jobs.synth import HELDOUT_DOCS
from latentmas.registry import load_registry
from latentmas.stage import StageContext, StageResult, skipped
from latentmas.training.base import base_sha, load_base, read_base_ref
from latentmas.training.baseimport import same_base
from latentmas.training.data import prompt_of, read_corpus_frame, read_sft
from latentmas.training.efficacy import own_domain_verdicts, perplexity_matrix
from latentmas.training.losses import activate, encode_examples, mixed_score, score
from latentmas.training.modelstore import cached_folder, download_verified
from latentmas.training.router import ROUTER_DIR
from latentmas.training.router_model import apply_mode, load_router, route
from latentmas.training.sft import ADAPTER_DIR
from latentmas.training.skips import active_experts, skipped_experts

EVALUATION = "evaluation.json"


def stage_files(manifest: dict[str, Any], folder: str) -> dict[str, str]:
    """name -> sha256 of a stage's outputs under `folder`, from its manifest."""
    return {o["key"][len(folder) :]: o["sha256"] for o in manifest["outputs"] if o["key"].startswith(folder)}


def fetch_stage_folder(ctx: StageContext, stage: str, expert: str | None, folder: str, dest: Path) -> Path:
    """Downloads a finished upstream stage's sub-folder, verified against that stage's manifest."""
    manifest = ctx.read_manifest(stage, expert)
    download_verified(ctx.store, ctx.bucket, ctx.prefix(stage, expert) + folder, stage_files(manifest, folder), dest)
    return dest


def evaluate_stage(ctx: StageContext) -> StageResult:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ctx.spec
    cycle_experts = active_experts(ctx)
    if not cycle_experts:
        return skipped("no expert has data this cycle")
    base_ref = read_base_ref(ctx)
    base_id = base_sha(base_ref)
    base_dir = load_base(ctx)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    experts = [e.name for e in cycle_experts]
    registry = load_registry(ctx.store, ctx.bucket, ctx.config.namespace, ctx.config.stack)
    adapters: dict[str, Path] = {
        name: fetch_stage_folder(ctx, "train", name, ADAPTER_DIR, ctx.workdir / "adapters" / name) for name in experts
    }
    predecessors: dict[str, dict[str, Any]] = {}
    for name in experts:
        active = registry.experts[name].active() if name in registry.experts else None
        if active is None:
            continue
        if not same_base(active.metrics.get("base_sha256"), base_ref["files"]):
            predecessors[name] = {"version": active.version, "note": "trained on a different base; not comparable"}
            continue
        slot = f"{name}__v{active.version}"
        adapters[slot] = cached_folder(ctx.store, ctx.bucket, active.prefix, active.files, kind="adapters")
        predecessors[name] = {"version": active.version, "slot": slot}
    team = PeftModel.from_pretrained(model, adapters[experts[0]], adapter_name=experts[0])
    for slot, folder in list(adapters.items())[1:]:
        team.load_adapter(folder, adapter_name=slot)
    team.eval()
    router_skipped = ctx.skip_reason("router")
    if router_skipped is None:
        router, router_config = load_router(fetch_stage_folder(ctx, "router", None, ROUTER_DIR, ctx.workdir / "router"))
        if router_config.experts != experts:
            raise ValueError(f"router experts {router_config.experts} differ from this cycle's experts {experts}")
    pad_id = pad_token_id(tokenizer)
    mode = spec.pipeline.training.router_mode
    max_length = spec.pipeline.training.max_seq_length
    report: dict[str, Any] = {
        name: {"skipped": True, "reason": reason} for name, reason in skipped_experts(ctx).items()
    }
    for index, expert in enumerate(cycle_experts):
        rows = read_sft(ctx, expert.domain, "heldout", spec.evaluation.max_heldout_examples)
        examples = encode_examples(tokenizer, [row["messages"] for row in rows], max_length)
        with team.disable_adapter():
            base_score = score(team, examples, pad_id)
            if router_skipped is None:
                gates = route(team, tokenizer, router, router_config, [prompt_of(row) for row in rows])
        activate(team, [expert.name])
        entry: dict[str, Any] = {
            "domain": expert.domain,
            "heldout_examples": len(rows),
            "base": base_score.as_dict(),
            "expert": score(team, examples, pad_id).as_dict(),
            "mixed": None,
            "router_top1_accuracy": None,
            "promoted": None,
        }
        if router_skipped is None:
            entry["mixed"] = mixed_score(team, examples, apply_mode(gates, mode), experts, pad_id).as_dict()
            entry["router_top1_accuracy"] = round(float((gates.argmax(dim=-1) == index).float().mean()), 4)
        previous = predecessors.get(expert.name, {})
        if "slot" in previous:
            activate(team, [previous["slot"]])
            entry["promoted"] = {"version": previous["version"], **score(team, examples, pad_id).as_dict()}
        elif previous:
            entry["promoted_note"] = f"v{previous['version']}: {previous['note']}"
        report[expert.name] = entry
        ctx.progress(index + 1, len(cycle_experts), expert=expert.name, loss=entry["expert"]["loss"])
    router_report = {"skipped": True, "reason": router_skipped}
    if router_skipped is None:
        router_report = ctx.read_manifest("router")["metrics"]
    efficacy = domain_efficacy(ctx, team, tokenizer, experts, pad_id)
    evaluation = {
        "base_sha256": base_id,
        "router_mode": mode,
        "experts": report,
        "router": router_report,
        **efficacy,
    }
    ctx.put_json(EVALUATION, evaluation)
    summary = {
        f"{name}_{kind}_perplexity": entry[kind]["perplexity"]
        for name, entry in report.items()
        for kind in ("base", "expert", "mixed")
        if entry.get(kind)
    }
    counts = {"experts": len(cycle_experts), "skipped_experts": len(report) - len(cycle_experts)}
    return StageResult(outputs=[EVALUATION], counts=counts, metrics=summary)


def heldout_documents(ctx: StageContext, domains: list[str]) -> dict[str, list[str]]:
    """Texts of the synth stage's held-out documents, per domain (documents no stage trained on)."""
    key = ctx.prefix("synth") + HELDOUT_DOCS
    if not ctx.store.exists(ctx.bucket, key):
        return {}
    ids: dict[str, list[str]] = json.loads(ctx.store.get_bytes(ctx.bucket, key))
    wanted = {doc_id: domain for domain in domains for doc_id in ids.get(domain, [])}
    texts: dict[str, list[str]] = {domain: [] for domain in domains}
    for row in read_corpus_frame(ctx, ["doc_id", "text"]).filter(pl.col("doc_id").is_in(list(wanted))).iter_rows():
        texts[wanted[row[0]]].append(str(row[1]))
    return {domain: found for domain, found in texts.items() if found}


def domain_efficacy(ctx: StageContext, team: Any, tokenizer: Any, experts: list[str], pad_id: int) -> dict[str, Any]:
    """The expert x domain plain-text perplexity matrix on held-out documents, with each expert's verdict."""
    budget = ctx.spec.evaluation.heldout_document_tokens
    domains = {e.name: e.domain for e in ctx.spec.experts if e.name in experts}
    documents = heldout_documents(ctx, sorted(set(domains.values()))) if budget else {}
    if not documents:
        return {}
    window = ctx.spec.pipeline.training.max_seq_length
    matrix = perplexity_matrix(team, tokenizer, documents, experts, pad_id, window, budget)
    return {"domain_perplexity": matrix, "domain_verdicts": own_domain_verdicts(matrix, domains)}


def read_evaluation(ctx: StageContext) -> dict[str, Any]:
    ctx.read_manifest("evaluate")
    return dict(json.loads(ctx.store.get_bytes(ctx.bucket, ctx.prefix("evaluate") + EVALUATION)))
