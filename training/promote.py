"""The `promote` stage: the evaluation gate and the atomic registry update. Each expert that passes the domain-
specific gate (`gate.expert_decision`: on its domain's held-out documents it beats the base and every other expert
by the configured margin with a bootstrap interval above 0, and does not regress against its promoted predecessor)
and whose tensor shapes fit the base is uploaded to `registry/experts/<name>/v<N>/`; the router, the base (when
new) and the data plane's index bundle likewise; of the two router kinds, the one that routes the natural questions
better (`gate.router_choice`), recording its kind and why. A new base is promoted only together with a passing
version of every expert that has a promoted version (never a new base beside adapters trained on the old one;
an expert that never passed does not hold the others back), and an adapter whose recorded
base is not this cycle's is refused with both identities. Only after every file is uploaded with its sha256 is
`registry.json` replaced, in one write. Refused candidates are recorded with the reason. Skipped experts and a
skipped router (no data this cycle) keep their promoted versions and are listed in `promotion.json` as
`{"promoted": false, "skipped": true, "reason": ...}`; an expert skipped while it has a promoted version blocks a
base change (its version would be left on the old base)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from latentmas.registry import (
    ArtifactEntry,
    ArtifactVersion,
    Registry,
    claim_version,
    update_registry,
    version_prefix,
)
from latentmas.stage import MANIFEST, STATUS_SUMMARY, StageContext, StageResult
from latentmas.training.base import base_facts, load_base, read_base_ref
from latentmas.training.baseimport import same_base, weight_files
from latentmas.training.evaluate import fetch_stage_folder, read_evaluation, stage_files
from latentmas.training.gate import (
    Decision,
    adapter_shape_problems,
    base_change_decision,
    base_mismatch,
    expert_decision,
    router_choice,
    router_decision,
    router_shape_problems,
)
from latentmas.training.modelstore import download_verified, folder_files, upload_folder
from latentmas.training.router import ROUTER_DIRS
from latentmas.training.routers import MLP_KIND
from latentmas.training.sft import ADAPTER_DIR
from latentmas.training.skips import active_experts, skipped_experts
from safetensors import safe_open

PROMOTION = "promotion.json"
INDEX_BUNDLE = "bundle/"
MAX_REJECTED = 100


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no weights loaded)."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def with_shape_check(decision: Decision, problems: list[str]) -> Decision:
    if not decision.promote or not problems:
        return decision
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return Decision(False, f"shape check against the base failed: {problems[0]}{more}")


def add_version(
    ctx: StageContext, entry: ArtifactEntry, kind: str, name: str, folder: Path, metrics: dict[str, Any]
) -> int:
    """Uploads `folder` as the entry's next unclaimed version and makes it current (in the in-memory registry)."""
    where = (ctx.store, ctx.bucket, ctx.config.namespace, ctx.config.stack)
    version = claim_version(*where, kind, name, entry.next_version(), ctx.config.cycle_id)
    prefix = version_prefix(ctx.config.namespace, ctx.config.stack, kind, name, version)
    files = upload_folder(ctx.store, ctx.bucket, prefix, folder)
    entry.history.append(
        ArtifactVersion(version=version, prefix=prefix, files=files, cycle=ctx.config.cycle_id, metrics=metrics)
    )
    entry.current = version
    return version


def reject(registry: Registry, ctx: StageContext, kind: str, name: str, reason: str, metrics: dict[str, Any]) -> None:
    record = {
        "kind": kind,
        "name": name,
        "cycle": ctx.config.cycle_id,
        "reason": reason,
        "metrics": metrics,
        "at": datetime.now(UTC).isoformat(),
    }
    registry.rejected = [*registry.rejected, record][-MAX_REJECTED:]


def base_shapes(folder: Path, files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the base's weights, over every shard."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in weight_files(files):
        shapes.update(tensor_shapes(folder / name))
    return shapes


def promote_stage(ctx: StageContext) -> StageResult:
    spec = ctx.spec
    skips = skipped_experts(ctx)
    evaluation = read_evaluation(ctx) if ctx.skip_reason("evaluate") is None else {"experts": {}, "router": {}}
    base_ref = read_base_ref(ctx)
    base_dir = load_base(ctx)
    base = base_facts(base_ref)
    shapes = base_shapes(base_dir, base_ref["files"])
    candidates: dict[str, tuple[Decision, Path, dict[str, Any]]] = {}
    for expert in spec.experts:
        if expert.name in skips:
            continue
        scores = evaluation["experts"][expert.name]
        folder = fetch_stage_folder(ctx, "train", expert.name, ADAPTER_DIR, ctx.workdir / "experts" / expert.name)
        rank = int(json.loads((folder / "adapter_config.json").read_text())["r"])
        problems = adapter_shape_problems(tensor_shapes(folder / "adapter_model.safetensors"), shapes, rank)
        train_metrics = ctx.read_manifest("train", expert.name)["metrics"]
        gated = expert_decision(scores, spec.evaluation.min_improvement, spec.evaluation.gate)
        decision = with_shape_check(gated, problems)
        trained_on = train_metrics.get("base") or {"identity": train_metrics.get("base_sha256")}
        if not same_base(trained_on.get("identity"), base_ref["files"]):
            decision = Decision(False, f"adapter {base_mismatch(trained_on, base)}")
        metrics = {
            "heldout_loss": scores["expert"]["loss"],
            "heldout_perplexity": scores["expert"]["perplexity"],
            "base_heldout_loss": scores["base"]["loss"],
            "served_heldout_loss": scores["served"]["loss"] if scores.get("served") else None,
            "gain_vs_base": (scores.get("comparisons") or {}).get("base"),
            "base_sha256": base["identity"],
            "base": base,
            "train_steps": train_metrics.get("steps"),
            "train_loss": train_metrics.get("train_loss"),
            "reason": decision.reason,
        }
        candidates[expert.name] = (decision, folder, metrics)
    decisions: dict[str, dict[str, Any]] = {}
    promoted: list[str] = []

    def apply(read: Registry) -> Registry:
        """The whole promotion against one read of the registry (re-run if another writer got there first)."""
        registry = read.model_copy(deep=True)
        decisions.clear()
        promoted.clear()
        for name, reason in skips.items():
            decisions[name] = {"promoted": False, "skipped": True, "reason": reason}
        current_base = registry.base.active()
        base_changed = current_base is None or current_base.files != base_ref["files"]
        gate = {name: c[0] for name, c in candidates.items()}
        for name in skips:
            if name in registry.experts and registry.experts[name].current is not None:
                gate[name] = Decision(False, "skipped this cycle")
        serving = {name for name, entry in registry.experts.items() if entry.current is not None}
        base_decision = base_change_decision(base_changed, gate, serving)
        for name, (decision, folder, metrics) in candidates.items():
            entry = registry.experts.setdefault(name, ArtifactEntry())
            if decision.promote and base_decision.promote:
                version = add_version(ctx, entry, "experts", name, folder, metrics)
                promoted.append(name)
                decisions[name] = {"promoted": True, "version": version, "reason": decision.reason}
            else:
                reason = decision.reason if not decision.promote else base_decision.reason
                reject(registry, ctx, "expert", name, reason, {**metrics, "reason": reason})
                decisions[name] = {"promoted": False, "reason": reason}
        if base_changed and base_decision.promote:
            version = add_version(
                ctx, registry.base, "base", "base", base_dir, {"source": base_ref["source"], **base_ref["model"]}
            )
            decisions["base"] = {"promoted": True, "version": version, "reason": base_decision.reason}
        elif base_changed:
            decisions["base"] = {"promoted": False, "reason": base_decision.reason}
        if base_decision.promote:
            decisions["router"] = promote_router(ctx, registry, evaluation, base_ref["model"])
        else:
            decisions["router"] = {"promoted": False, "reason": base_decision.reason}
        decisions["index"] = promote_index(ctx, registry)
        return registry

    saved = update_registry(ctx.store, ctx.bucket, ctx.config.namespace, ctx.config.stack, apply)
    ctx.put_json(PROMOTION, {"revision": saved.revision, "decisions": decisions})
    rejected = sorted(
        name for name, d in decisions.items() if not d["promoted"] and "reason" in d and not d.get("skipped")
    )
    skipped_names = sorted(name for name, d in decisions.items() if d.get("skipped") is True)
    return StageResult(
        outputs=[PROMOTION],
        counts={
            "promoted": sum(1 for d in decisions.values() if d["promoted"]),
            "rejected": len(rejected),
            "skipped": len(skipped_names),
        },
        metrics={
            "registry_revision": saved.revision,
            "promoted": promoted,
            "rejected": rejected,
            "skipped": skipped_names,
            STATUS_SUMMARY: "; ".join(f"{name}: {describe(d)}" for name, d in decisions.items()),
        },
    )


def describe(decision: dict[str, Any]) -> str:
    """One decision in a few words: promoted vN (and router kind), skipped, or refused with its reason."""
    if decision.get("promoted"):
        kind = f" ({decision['kind']})" if decision.get("kind") else ""
        return f"promoted v{decision['version']}{kind}"
    if decision.get("skipped"):
        return "skipped"
    return f"refused: {decision.get('reason', '')}"


def promote_router(
    ctx: StageContext, registry: Registry, evaluation: dict[str, Any], model: dict[str, Any]
) -> dict[str, Any]:
    reason = ctx.skip_reason("router")
    if reason is not None:
        return {"promoted": False, "skipped": True, "reason": reason}
    experts = [e.name for e in active_experts(ctx)]
    kinds = evaluation["router"].get("kinds")
    if kinds:
        choice = router_choice(kinds)
        kind, accuracy, why = choice.kind, choice.accuracy, choice.reason
    else:  # an evaluation from before there were two kinds: the MLP, judged on held-out prompts
        old = evaluation["router"]
        accuracy = float(old["heldout"]["accuracy"] if "heldout" in old else old["heldout_accuracy"])
        kind, why = MLP_KIND, "the only router kind"
    folder = fetch_stage_folder(ctx, "router", None, ROUTER_DIRS[kind], ctx.workdir / "router")
    config = json.loads((folder / "router.json").read_text())
    available = {name for name, entry in registry.experts.items() if entry.current is not None}
    decision = router_decision(accuracy, ctx.spec.evaluation.min_router_accuracy, experts, available)
    decision = with_shape_check(
        decision, router_shape_problems(config, int(model["hidden_size"]), int(model["num_hidden_layers"]), experts)
    )
    if decision.promote:
        decision = Decision(True, f"{decision.reason}; {why}")
    metrics = {"kind": kind, "accuracy": accuracy, "experts": experts, "reason": decision.reason, "choice": why}
    if not decision.promote:
        reject(registry, ctx, "router", "router", decision.reason, metrics)
        return {"promoted": False, "reason": decision.reason}
    metrics["expert_versions"] = {name: registry.experts[name].current for name in experts if name in available}
    version = add_version(ctx, registry.router, "router", "router", folder, metrics)
    return {"promoted": True, "version": version, "kind": kind, "reason": decision.reason}


def promote_index(ctx: StageContext, registry: Registry) -> dict[str, Any]:
    """Registers the data plane's index bundle when this cycle's index stage finished and it changed."""
    if not ctx.store.exists(ctx.bucket, ctx.prefix("index") + MANIFEST):
        return {"promoted": False, "skipped": "no index stage output in this cycle"}
    files = stage_files(ctx.read_manifest("index"), INDEX_BUNDLE)
    if not files:
        return {"promoted": False, "skipped": "the index stage wrote no bundle/"}
    active = registry.index.active()
    if active is not None and active.files == files:
        return {"promoted": False, "skipped": f"bundle unchanged since v{active.version}"}
    folder = ctx.workdir / "index"
    download_verified(ctx.store, ctx.bucket, ctx.prefix("index") + INDEX_BUNDLE, files, folder)
    if folder_files(folder) != files:
        raise ValueError("index bundle changed while being copied")
    version = add_version(ctx, registry.index, "index", "index", folder, {"files": len(files)})
    return {"promoted": True, "version": version}
