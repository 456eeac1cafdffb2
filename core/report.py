"""`latentmas report`: what a cycle achieved, as markdown with PNG plots — held-out perplexity per
expert (base vs expert vs routed), router accuracy and confusion, retrieval quality, stage durations,
and the change from the previous cycle."""

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


@dataclass(frozen=True)
class CycleFacts:
    """Everything the report needs from one cycle, read from its manifests and evaluation."""

    cycle_id: str
    evaluation: dict[str, Any]
    router: dict[str, Any]
    retrieval: dict[str, float]
    durations: dict[str, float]


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
    return CycleFacts(cycle_id, evaluation, router, retrieval, durations)


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
    """(expert, base, expert, routed) held-out perplexities; skipped experts are left out, and the routed
    value is NaN when no router ran."""
    return [
        (name, e["base"]["perplexity"], e["expert"]["perplexity"], e["mixed"]["perplexity"] if e["mixed"] else math.nan)
        for name, e in facts.evaluation["experts"].items()
        if not e.get("skipped")
    ]


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
    router = current.router.get("heldout", {})
    lines = [
        f"# Evolution cycle report: {current.cycle_id}",
        "",
        "Written by `latentmas report`; every figure is read from the cycle's manifests in object storage.",
        "",
        "## Held-out perplexity per expert",
        "",
        "| expert | base | expert | routed (router mixture) |",
        "|---|---:|---:|---:|",
        *[f"| {n} | {b:.2f} | {e:.2f} | {m:.2f} |" for n, b, e, m in perplexity_rows(current)],
        "",
        f"![perplexity]({images['perplexity']})",
        "",
        *efficacy_lines(current),
        "## Router",
        "",
        f"Held-out top-1 accuracy: **{router.get('accuracy', float('nan')):.1%}** over {router.get('examples', 0)} "
        f"prompts; mean gate entropy {router.get('gate_entropy', float('nan')):.3f} "
        f"(max {router.get('gate_entropy_max', float('nan')):.3f}).",
        "",
        f"![router confusion]({images['confusion']})",
        "",
        "## Retrieval (generated query → chunk pairs from the held-out split)",
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
    for offset, (label, column) in zip((-0.27, 0.0, 0.27), (("base", 1), ("expert", 2), ("routed", 3)), strict=True):
        ax.bar(x + offset, [r[column] for r in rows], width=0.27, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)
    plt.close(fig)

    router = current.router.get("heldout", {})
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


def write_report(current: CycleFacts, previous: CycleFacts | None, markdown_path: Path) -> Path:
    images = plot(current, markdown_path.parent / markdown_path.stem)
    markdown_path.write_text(render_markdown(current, previous, images))
    return markdown_path
