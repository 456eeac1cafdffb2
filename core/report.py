"""`latentmas report`: what a cycle achieved, as markdown with PNG plots — held-out perplexity per
expert (base vs expert vs served route), the cross-domain answer-loss matrix with intervals, both router kinds
on the natural questions with confusion matrices, the gate's decisions, retrieval quality (the index stage's
figures), stage durations, and the change from the previous cycle."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentmas.stage import MANIFEST, stage_prefix
from latentmas.store import ObjectNotFound, ObjectStore

EVALUATION_FILE = "evaluation.json"
ROUTER_METRICS_FILE = "metrics.json"
PROMOTION_FILE = "promotion.json"


@dataclass(frozen=True)
class CycleFacts:
    """Everything the report needs from one cycle, read from its manifests and evaluation."""

    cycle_id: str
    evaluation: dict[str, Any]
    router: dict[str, Any]
    retrieval: dict[str, float]
    durations: dict[str, float]
    promotion: dict[str, Any]


def read_cycle(store: ObjectStore, bucket: str, namespace: str, stack: str, cycle_id: str) -> CycleFacts:
    root = f"{namespace}/{stack}/cycles/{cycle_id}/"
    manifests = {
        info.key.removeprefix(root).removesuffix(f"/{MANIFEST}").replace("/", "-"): json.loads(
            store.get_bytes(bucket, info.key)
        )
        for info in store.list(bucket, root)
        if info.key.endswith(MANIFEST)
    }
    if not manifests:
        raise ObjectNotFound(f"cycle {cycle_id}: no stage manifests under {bucket}/{root}")
    evaluate_key = stage_prefix(namespace, stack, cycle_id, "evaluate") + EVALUATION_FILE
    if not store.exists(bucket, evaluate_key):
        raise ObjectNotFound(f"cycle {cycle_id} has no evaluation ({bucket}/{evaluate_key}): run it to the end first")
    evaluation = dict(json.loads(store.get_bytes(bucket, evaluate_key)))
    router_key = stage_prefix(namespace, stack, cycle_id, "router") + ROUTER_METRICS_FILE
    # A skipped router run (fewer than two experts with data) wrote no metrics.
    router = dict(json.loads(store.get_bytes(bucket, router_key))) if store.exists(bucket, router_key) else {}
    index_metrics = manifests.get("index", {}).get("metrics", {})
    retrieval = {
        k: float(v)
        for k, v in _flatten(index_metrics).items()
        if isinstance(v, int | float) and ("recall" in k or "ndcg" in k)
    }
    durations = {run: float(m["durationSeconds"]) for run, m in sorted(manifests.items())}
    promotion_key = stage_prefix(namespace, stack, cycle_id, "promote") + PROMOTION_FILE
    promotion = dict(json.loads(store.get_bytes(bucket, promotion_key))) if store.exists(bucket, promotion_key) else {}
    return CycleFacts(cycle_id, evaluation, router, retrieval, durations, promotion)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def perplexity_rows(facts: CycleFacts) -> list[tuple[str, float, float, float]]:
    """(expert, base, expert, served) held-out perplexities; skipped experts are left out, and the served value
    is NaN when no router ran (`mixed` in evaluations written before evaluation scored the served route)."""
    rows = []
    for name, e in facts.evaluation["experts"].items():
        if e.get("skipped"):
            continue
        served = e.get("served") or e.get("mixed")
        rows.append(
            (name, e["base"]["perplexity"], e["expert"]["perplexity"], served["perplexity"] if served else math.nan)
        )
    return rows


def matrix_lines(facts: CycleFacts) -> list[str]:
    """The model x domain answer-loss matrix on held-out documents, each cell with its bootstrap interval."""
    matrix: dict[str, dict[str, Any]] = facts.evaluation.get("answer_loss_matrix") or {}
    if not matrix:
        return []
    domains = sorted({domain for cells in matrix.values() for domain in cells})
    level = float(facts.evaluation.get("confidence", 0.95))
    lines = [
        "## Cross-domain answer loss (model x domain, held-out documents)",
        "",
        f"Answer-token loss of held-out examples in the serving prompt layout, {level:.0%} bootstrap interval over "
        "documents in brackets; lower is better. An expert that learned its domain is lowest in its own column; one "
        "that learned only the chat format is low everywhere.",
        "",
        "| model \\ domain | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for row, cells in matrix.items():
        values = [
            f"{c['loss']:.3f} [{c['loss_low']:.3f}, {c['loss_high']:.3f}]" if (c := cells.get(d)) else "-"
            for d in domains
        ]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    documents = {d: next((cells[d]["documents"] for cells in matrix.values() if d in cells), 0) for d in domains}
    lines += ["", "Documents per domain: " + ", ".join(f"{d} {n}" for d, n in documents.items()) + ".", ""]
    return lines


def gate_lines(facts: CycleFacts) -> list[str]:
    """Each promotion decision and its reason, as the promote stage recorded it."""
    decisions: dict[str, dict[str, Any]] = facts.promotion.get("decisions") or {}
    if not decisions:
        return []
    lines = ["## Gate decisions", "", "| artifact | promoted | reason |", "|---|---|---|"]
    for name, decision in decisions.items():
        verdict = "skipped" if decision.get("skipped") else ("yes" if decision.get("promoted") else "no")
        version = f" (v{decision['version']})" if decision.get("version") else ""
        reason = str(decision.get("reason") or decision.get("skipped") or "").replace("|", "/")
        lines.append(f"| {name} | {verdict}{version} | {reason} |")
    return [*lines, ""]


def router_lines(facts: CycleFacts) -> list[str]:
    """Both router kinds on the natural questions (test half) and the held-out SFT questions, with confusion
    matrices side by side, and which kind the gate chose."""
    kinds: dict[str, dict[str, Any]] = facts.router.get("kinds") or {}
    experts: list[str] = facts.router.get("experts", [])
    if not kinds:
        held = facts.router.get("heldout", {})
        return [
            "## Router",
            "",
            f"Held-out top-1 accuracy: **{held.get('accuracy', float('nan')):.1%}** "
            f"over {held.get('examples', 0)} prompts.",
            "",
        ]
    lines = ["## Router", "", "| kind | natural questions (test half) | held-out SFT questions |", "|---|---:|---:|"]
    for kind, metrics in kinds.items():
        natural = metrics.get("natural")
        shown = f"{natural['accuracy']:.1%} of {natural['examples']}" if natural else "-"
        lines.append(f"| {kind} | {shown} | {metrics['heldout']['accuracy']:.1%} of {metrics['heldout']['examples']} |")
    choice = facts.router.get("choice", {})
    held = kinds.get(choice.get("kind", ""), {}).get("heldout", {})
    lines += [
        "",
        f"Chosen: **{choice.get('kind', '-')}**: {choice.get('reason', '')}. "
        f"Held-out top-1 accuracy: **{held.get('accuracy', 0.0):.1%}** over {held.get('examples', 0)} prompts.",
        "",
    ]
    for kind, metrics in kinds.items():
        part = "natural" if "natural" in metrics else "heldout"
        confusion = metrics[part]["confusion"]
        lines += [
            f"Confusion of {kind} on the {'natural questions' if part == 'natural' else 'held-out SFT questions'} "
            "(rows: true domain, columns: routed to):",
            "",
            "| true \\ routed | " + " | ".join(experts) + " |",
            "|---|" + "---:|" * len(experts),
            *[f"| {experts[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(confusion)],
            "",
        ]
    return lines


def efficacy_lines(facts: CycleFacts) -> list[str]:
    """The expert x domain plain-text perplexity matrix on held-out documents, and each expert's verdict."""
    matrix: dict[str, dict[str, Any]] = facts.evaluation.get("domain_perplexity") or {}
    if not matrix:
        return []
    domains = sorted({domain for cells in matrix.values() for domain in cells})
    verdicts: dict[str, dict[str, Any]] = facts.evaluation.get("domain_verdicts", {})
    tokens = {d: next(iter(matrix.values()))[d]["tokens"] for d in domains if d in next(iter(matrix.values()))}
    lines = [
        "## Learning efficacy: plain-text perplexity of held-out documents (model x domain)",
        "",
        "Held-out documents of each domain (no stage trained on them), scored as plain text; lower is better. "
        "Goal: each expert below the base and below every other expert on its own domain.",
        "",
        "| model \\ domain | " + " | ".join(f"{d} ({tokens.get(d, 0)} tok)" for d in domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for row, cells in matrix.items():
        values = [f"{float(cells[d]['perplexity']):.2f}" if d in cells else "-" for d in domains]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    lines += ["", "| expert | own domain | below base | below every other expert |", "|---|---:|---|---|"]
    for name, verdict in verdicts.items():
        lines.append(
            f"| {name} | {verdict['perplexity']:.2f} | {'yes' if verdict['beats_base'] else 'no'} "
            f"| {'yes' if verdict['beats_others'] else 'no'} |"
        )
    return [*lines, ""]


def render_markdown(current: CycleFacts, previous: CycleFacts | None, images: dict[str, str]) -> str:
    lines = [
        f"# Evolution cycle report: {current.cycle_id}",
        "",
        "Written by `latentmas report`; every figure is read from the cycle's manifests in object storage.",
        "",
        "## Held-out perplexity per expert",
        "",
        "| expert | base | expert | served (router + fallback) |",
        "|---|---:|---:|---:|",
        *[f"| {n} | {b:.2f} | {e:.2f} | {m:.2f} |" for n, b, e, m in perplexity_rows(current)],
        "",
        f"![perplexity]({images['perplexity']})",
        "",
        *matrix_lines(current),
        *efficacy_lines(current),
        *router_lines(current),
        f"![router confusion]({images['confusion']})",
        "",
        *gate_lines(current),
        "## Retrieval (from the index stage's manifest)",
        "",
        "| metric | value |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in sorted(current.retrieval.items())],
        "",
        "## Stage durations",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in current.durations.items()],
        "",
        f"![durations]({images['durations']})",
    ]
    if previous:
        before = {n: e for n, _, e, _ in perplexity_rows(previous)}
        lines += [
            "",
            f"## Change since cycle {previous.cycle_id}",
            "",
            "| expert | previous perplexity | this cycle | change |",
            "|---|---:|---:|---:|",
            *[
                f"| {n} | {before[n]:.2f} | {e:.2f} | {(e - before[n]) / before[n]:+.1%} |"
                for n, _, e, _ in perplexity_rows(current)
                if n in before
            ],
        ]
    return "\n".join(lines) + "\n"


def plot(current: CycleFacts, out: Path) -> dict[str, str]:
    """Writes the PNG plots next to the report; returns their paths relative to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    rows = perplexity_rows(current)
    names = [r[0] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for offset, (label, column) in zip((-0.27, 0.0, 0.27), (("base", 1), ("expert", 2), ("served", 3)), strict=True):
        ax.bar(x + offset, [r[column] for r in rows], width=0.27, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)
    plt.close(fig)

    kinds = current.router.get("kinds") or {}
    chosen = kinds.get(current.router.get("choice", {}).get("kind", ""), {})
    router = chosen.get("natural") or chosen.get("heldout") or current.router.get("heldout", {})
    experts = current.router.get("experts", names)
    matrix = np.array(router.get("confusion", [[0]]), dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(experts)), experts, rotation=30)
    ax.set_yticks(range(len(experts)), experts)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true domain")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{int(value)}", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    stages = list(current.durations)
    ax.barh(stages, [current.durations[s] for s in stages])
    ax.set_xlabel("seconds")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "durations.png", dpi=110)
    plt.close(fig)
    return {k: f"{out.name}/{k}.png" for k in ("perplexity", "confusion", "durations")}


def citation_lines(citations: dict[str, Any] | None) -> list[str]:
    """Share of answer sentences supported by the passages they cite, per domain (`latentmas citations`)."""
    if not citations:
        return []
    lines = [
        "## Answers supported by their citations (natural questions, test half)",
        "",
        f"Path: {citations['path']}; measure: {citations['measure']}; {citations['questions_per_domain']} questions "
        f"per domain, up to {citations['max_new_tokens']} new tokens.",
        "",
        "| domain | answers | sentences | citing a passage | supported | share supported |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for domain, row in citations["per_domain"].items():
        lines.append(
            f"| {domain} | {row['answers']} | {row['sentences']} | {row['cited_sentences']} "
            f"| {row['supported_sentences']} | {row['supported_share']:.1%} |"
        )
    return [*lines, ""]


def write_report(
    current: CycleFacts, previous: CycleFacts | None, markdown_path: Path, citations: dict[str, Any] | None = None
) -> Path:
    images = plot(current, markdown_path.parent / markdown_path.stem)
    markdown = render_markdown(current, previous, images)
    extra = citation_lines(citations)
    if extra:
        marker = "## Retrieval"
        markdown = markdown.replace(marker, "\n".join(extra) + "\n" + marker, 1)
    markdown_path.write_text(markdown)
    return markdown_path
