"""The `evaluate` stage: the answer loss of held-out examples (documents no stage trained on, in the layout
serving uses) under the base, every candidate expert and the currently promoted versions (when trained on the
same base), for every domain: the full model x domain matrix, each cell with a bootstrap interval over
documents. Each expert's entry holds its gain over the base, over every other expert and over its promoted
version on its own domain (what the gate decides on), and the score of what serving would answer with: the
router kind the gate chose, reduced by `services.routing.decide` with `inference.routingMode` and its
low-confidence fallback to the base. Writes `evaluation.json`; the manifest's metrics carry a compact
summary for the stack's status. Skipped experts (no data this cycle) appear as `{"skipped": true, "reason":
...}`; when the router run was skipped, `router` says so and no served score is computed; with no expert left
the run itself is skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import torch
from latentmas.chat import pad_token_id
from latentmas.jobs.synth import HELDOUT_DOCS
from latentmas.prompts import routing_text
from latentmas.registry import load_registry
from latentmas.services.routing import RouteDecision, decide
from latentmas.stage import STATUS_SUMMARY, StageContext, StageResult, skipped
from latentmas.training.base import base_sha, load_base, read_base_ref
from latentmas.training.baseimport import same_base
from latentmas.training.context import serving_layout
from latentmas.training.data import document_of, read_corpus_frame, read_sft, spread_by_document
from latentmas.training.efficacy import BASE_ROW, own_domain_verdicts, perplexity_matrix
from latentmas.training.gate import router_choice
from latentmas.training.losses import Example, Score, activate, adapter_mixture, encode_examples, score_each
from latentmas.training.modelstore import cached_folder, download_verified
from latentmas.training.router import ROUTER_DIRS, read_router_metrics
from latentmas.training.routers import MLP_KIND, Router, load_any_router
from latentmas.training.sft import ADAPTER_DIR
from latentmas.training.significance import CONFIDENCE, loss_interval, relative_gain
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
    router: Router | None = None
    if router_skipped is None:
        kinds = read_router_metrics(ctx).get("kinds")
        kind = router_choice(kinds).kind if kinds else MLP_KIND
        router = load_any_router(fetch_stage_folder(ctx, "router", None, ROUTER_DIRS[kind], ctx.workdir / kind))
        if router.experts != experts:
            raise ValueError(f"router experts {router.experts} differ from this cycle's experts {experts}")
    pad_id = pad_token_id(tokenizer)
    max_length = spec.pipeline.training.max_seq_length
    domains = {expert.name: expert.domain for expert in cycle_experts}
    heldout = {
        expert.domain: spread_by_document(read_sft(ctx, expert.domain, "heldout"), spec.evaluation.max_heldout_examples)
        for expert in cycle_experts
    }
    examples = {
        domain: encode_examples(tokenizer, serving_layout(ctx, domain, rows, oracle=True), max_length)
        for domain, rows in heldout.items()
    }
    documents = {domain: [document_of(row) for row in rows] for domain, rows in heldout.items()}
    rows = [BASE_ROW, *experts, *(p["slot"] for p in predecessors.values() if "slot" in p)]
    each: dict[str, dict[str, list[Score]]] = {}
    for index, row in enumerate(rows):
        each[row] = {d: score_rows(team, row, examples[d], pad_id) for d in examples}
        ctx.progress(index + 1, len(rows) + 1, scored=row)
    scores: ScoreMatrix = {
        row: {d: by_document(parts, documents[d]) for d, parts in cells.items()} for row, cells in each.items()
    }
    served: dict[str, Any] = {}
    if router is not None:
        for domain, rows_of_domain in heldout.items():
            questions = [routing_text(r["messages"]) for r in rows_of_domain]
            with team.disable_adapter():
                gates = router.gates(team, tokenizer, questions, spec.inference.router_temperature)
            decisions = [
                decide(
                    dict(zip(experts, g, strict=True)),
                    spec.inference.routing_mode,
                    spec.inference.confidence_threshold,
                    set(experts),
                )
                for g in gates.tolist()
            ]
            known = {row: each[row][domain] for row in (BASE_ROW, *experts)}
            served[domain] = served_scores(team, examples[domain], documents[domain], decisions, pad_id, known)
    ctx.progress(len(rows) + 1, len(rows) + 1)
    report: dict[str, Any] = {
        name: {"skipped": True, "reason": reason} for name, reason in skipped_experts(ctx).items()
    }
    for expert in cycle_experts:
        entry = expert_entry(expert.name, domains, scores, served.get(expert.domain), predecessors)
        report[expert.name] = {"heldout_examples": len(heldout[expert.domain]), **entry}
    router_report = {"skipped": True, "reason": router_skipped}
    if router_skipped is None:
        router_report = read_router_metrics(ctx)
    efficacy = domain_efficacy(ctx, team, tokenizer, experts, pad_id)
    evaluation = {
        "base_sha256": base_id,
        "routing": {
            "mode": spec.inference.routing_mode,
            "confidence_threshold": spec.inference.confidence_threshold,
            "router_kind": router.kind if router else None,
        },
        "confidence": CONFIDENCE,
        "experts": report,
        "answer_loss_matrix": matrix_table(scores),
        "router": router_report,
        **efficacy,
    }
    ctx.put_json(EVALUATION, evaluation)
    counts = {"experts": len(cycle_experts), "skipped_experts": len(report) - len(cycle_experts)}
    return StageResult(outputs=[EVALUATION], counts=counts, metrics=status_summary(report))


ScoreMatrix = dict[str, dict[str, dict[str, tuple[float, int]]]]  # row -> domain -> document -> (nll, tokens)


def score_rows(team: Any, row: str, examples: list[Example], pad_id: int) -> list[Score]:
    """Per-example scores of the base (`BASE_ROW`) or one loaded adapter."""
    if row == BASE_ROW:
        with team.disable_adapter():
            return score_each(team, examples, pad_id)
    activate(team, [row])
    return score_each(team, examples, pad_id)


def by_document(scores: list[Score], documents: list[str]) -> dict[str, tuple[float, int]]:
    """Example scores summed per source document."""
    totals: dict[str, tuple[float, int]] = {}
    for part, document in zip(scores, documents, strict=True):
        nll, tokens = totals.get(document, (0.0, 0))
        totals[document] = (nll + part.nll, tokens + part.tokens)
    return totals


def served_scores(
    team: Any,
    examples: list[Example],
    documents: list[str],
    decisions: list[RouteDecision],
    pad_id: int,
    known: dict[str, list[Score]] | None = None,
) -> dict[str, Any]:
    """Each example scored as serving answers it: the routing decision's experts with their weights, or the base
    when the router is not confident. Returns per-document scores and where the examples were routed. A decision
    for one expert at full weight, or for the base, is the matrix row already scored (`known`: row -> per-example
    scores) and is read from it instead of scored again; only real mixtures run the model."""
    known = known or {}
    groups: dict[tuple[tuple[str, float], ...], list[int]] = {}
    for index, decision in enumerate(decisions):
        groups.setdefault(tuple(decision.experts), []).append(index)
    results: list[Score | None] = [None] * len(examples)
    for chosen, indices in groups.items():
        row = reused_row(chosen)
        if row in known:
            parts = [known[row][i] for i in indices]
        elif chosen:
            with adapter_mixture(team, dict(chosen)):
                parts = score_each(team, [examples[i] for i in indices], pad_id)
        else:
            with team.disable_adapter():
                parts = score_each(team, [examples[i] for i in indices], pad_id)
        for i, part in zip(indices, parts, strict=True):
            results[i] = part
    routed: dict[str, int] = {}
    for decision in decisions:
        target = decision.experts[0][0] if decision.experts else f"base ({decision.reason})"
        routed[target] = routed.get(target, 0) + 1
    return {"documents": by_document([r for r in results if r is not None], documents), "routed_to": routed}


def reused_row(chosen: tuple[tuple[str, float], ...]) -> str | None:
    """The matrix row a routing decision equals: the base (no expert) or one expert at weight 1 (LoRA scale 1)."""
    if not chosen:
        return BASE_ROW
    if len(chosen) == 1 and abs(chosen[0][1] - 1.0) < 1e-9:
        return chosen[0][0]
    return None


def aggregate(per_document: dict[str, tuple[float, int]]) -> dict[str, Any]:
    """Token-weighted loss and perplexity over documents, with the bootstrap interval of the loss."""
    total = Score(sum(n for n, _ in per_document.values()), sum(t for _, t in per_document.values()))
    low, high = loss_interval(per_document)
    return {**total.as_dict(), "documents": len(per_document), "loss_low": round(low, 5), "loss_high": round(high, 5)}


def matrix_table(scores: ScoreMatrix) -> dict[str, dict[str, dict[str, Any]]]:
    """The full row x domain answer-loss matrix (base, every expert, promoted versions) with intervals."""
    return {row: {domain: aggregate(docs) for domain, docs in cells.items()} for row, cells in scores.items()}


def expert_entry(
    name: str,
    domains: dict[str, str],
    scores: ScoreMatrix,
    served: dict[str, Any] | None,
    predecessors: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """What the gate reads for one expert, all on its own domain's held-out documents: its score, the base's, the
    served route's, and its gain over the base, every other expert and its promoted predecessor, with intervals."""
    domain = domains[name]
    own = scores[name][domain]
    comparisons = {"base": relative_gain(scores[BASE_ROW][domain], own).as_dict()}
    comparisons.update(
        {other: relative_gain(scores[other][domain], own).as_dict() for other in domains if other != name}
    )
    entry: dict[str, Any] = {
        "domain": domain,
        "base": aggregate(scores[BASE_ROW][domain]),
        "expert": aggregate(own),
        "served": None,
        "comparisons": comparisons,
        "promoted": None,
        "vs_promoted": None,
    }
    if served is not None:
        entry["served"] = {**aggregate(served["documents"]), "routed_to": served["routed_to"]}
        entry["served_vs_base"] = relative_gain(scores[BASE_ROW][domain], served["documents"]).as_dict()
    previous = predecessors.get(name, {})
    if "slot" in previous:
        entry["promoted"] = {"version": previous["version"], **aggregate(scores[previous["slot"]][domain])}
        gain = relative_gain(scores[previous["slot"]][domain], own).as_dict()
        entry["vs_promoted"] = {"version": previous["version"], **gain}
    elif previous:
        entry["promoted_note"] = f"v{previous['version']}: {previous['note']}"
    return entry


def status_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The compact numbers the stack's status carries: per expert, its gain over the base and over the closest
    other expert (with interval bounds) and the served route's perplexity, plus one line (`statusSummary`) for
    the stage's status message."""
    summary: dict[str, Any] = {}
    lines: list[str] = []
    for name, entry in report.items():
        if entry.get("skipped"):
            lines.append(f"{name}: skipped")
            continue
        base = entry["comparisons"]["base"]
        lines.append(f"{name}: {base['gain']:+.1%} vs base [{base['low']:+.1%}, {base['high']:+.1%}]")
        summary[f"{name}_gain_vs_base"] = base["gain"]
        summary[f"{name}_gain_vs_base_low"] = base["low"]
        others = {r: g for r, g in entry["comparisons"].items() if r != "base"}
        if others:
            closest = min(others.values(), key=lambda g: g["low"])
            summary[f"{name}_gain_vs_others"] = closest["gain"]
            summary[f"{name}_gain_vs_others_low"] = closest["low"]
            lines[-1] += f", {closest['gain']:+.1%} vs closest expert [{closest['low']:+.1%}, {closest['high']:+.1%}]"
        summary[f"{name}_expert_perplexity"] = entry["expert"]["perplexity"]
        summary[f"{name}_base_perplexity"] = entry["base"]["perplexity"]
        if entry.get("served"):
            summary[f"{name}_served_perplexity"] = entry["served"]["perplexity"]
    summary[STATUS_SUMMARY] = "; ".join(lines)
    return summary


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
