"""Pure promotion decisions: does a candidate show a domain-specific gain, which router kind serves, and do
tensor shapes fit the base? No I/O here, so every rule is unit-testable with plain dicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
PEFT_PREFIX = "base_model.model."
MIN_DOCUMENTS = 3  # fewer held-out documents cannot carry a bootstrap interval


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def _interval(gain: dict[str, Any]) -> str:
    return f"{gain['gain']:+.2%} (95% CI [{gain['low']:+.2%}, {gain['high']:+.2%}], {gain['documents']} documents)"


def expert_decision(entry: dict[str, Any], margin: float, gate: str = "domain") -> Decision:
    """Domain-specific gain: on its domain's held-out documents the candidate's answer loss must be lower than the
    base's AND every other expert's by the relative `margin`, each with a bootstrap interval over documents above 0
    (`comparisons`: reference -> gain), and no lower than the currently promoted version's (`vs_promoted`).
    Beating the base alone is not enough: an expert that only learned the chat format beats it too. With
    `gate="base"` (`evaluation.gate`, for smoke tests on too few documents) only the gain over the base and the
    regression check count."""
    comparisons: dict[str, dict[str, Any]] | None = entry.get("comparisons")
    if not comparisons or "base" not in comparisons:
        return Decision(False, "the evaluation holds no per-document comparison with the base; re-run evaluate")
    if gate == "base":
        return _base_only(comparisons["base"], entry.get("vs_promoted"), margin)
    documents = int(comparisons["base"]["documents"])
    if documents < MIN_DOCUMENTS:
        return Decision(
            False, f"only {documents} held-out document(s) in its domain; an interval needs at least {MIN_DOCUMENTS}"
        )
    for reference, gain in comparisons.items():
        label = "the base" if reference == "base" else f"expert {reference}"
        if gain["gain"] < margin:
            return Decision(False, f"gain over {label} {_interval(gain)} is below the {margin:.2%} margin")
        if gain["low"] <= 0:
            return Decision(False, f"gain over {label} {_interval(gain)}: the interval includes 0")
    promoted = entry.get("vs_promoted")
    if promoted is not None and promoted["gain"] < 0:
        return Decision(False, f"regresses against promoted v{promoted['version']}: {_interval(promoted)}")
    others = {r: g for r, g in comparisons.items() if r != "base"}
    reason = f"beats the base by {_interval(comparisons['base'])}"
    if others:
        closest = min(others, key=lambda r: others[r]["low"])
        reason += f" and every other expert (closest: {closest} {_interval(others[closest])})"
    if promoted is not None:
        reason += f"; vs promoted v{promoted['version']}: {promoted['gain']:+.2%}"
    return Decision(True, f"{reason}; margin {margin:.2%}")


def _base_only(gain: dict[str, Any], promoted: dict[str, Any] | None, margin: float) -> Decision:
    """The `base` gate: the gain over the base reaches the margin and the promoted version is not better."""
    if gain["gain"] < margin:
        return Decision(False, f"gain over the base {_interval(gain)} is below the {margin:.2%} margin (gate: base)")
    if promoted is not None and promoted["gain"] < 0:
        return Decision(False, f"regresses against promoted v{promoted['version']}: {_interval(promoted)}")
    return Decision(True, f"beats the base by {_interval(gain)}; margin {margin:.2%} (gate: base, no interval)")


@dataclass(frozen=True)
class RouterChoice:
    kind: str
    accuracy: float
    measured_on: str
    reason: str


def router_choice(kinds: dict[str, dict[str, Any]]) -> RouterChoice:
    """Which router kind to serve: the one with the higher top-1 accuracy on the natural questions' test half
    (what users ask); without natural questions, on the held-out SFT questions. Ties go to the first kind listed."""
    measured_on = "natural" if all("natural" in metrics for metrics in kinds.values()) else "heldout"
    accuracy = {kind: float(metrics[measured_on]["accuracy"]) for kind, metrics in kinds.items()}
    best = max(accuracy, key=lambda kind: accuracy[kind])
    where = "natural questions (test half)" if measured_on == "natural" else "held-out SFT questions (no natural set)"
    shown = ", ".join(f"{kind} {value:.4f}" for kind, value in accuracy.items())
    return RouterChoice(best, accuracy[best], measured_on, f"{best} routes best on the {where}: {shown}")


def router_decision(accuracy: float, min_accuracy: float, experts: list[str], available: set[str]) -> Decision:
    """A router is promoted when accurate enough (on what `router_choice` measured it) and at least one expert it
    routes to has a promoted version; questions it sends to an expert without one are answered by the base
    (`services.routing.decide`), so a cycle that promotes some experts still routes to them."""
    if not set(experts) & available:
        return Decision(False, "router routes to no expert with a promoted version")
    if accuracy < min_accuracy:
        return Decision(False, f"router held-out accuracy {accuracy:.4f} < required {min_accuracy:.4f}")
    missing = [name for name in experts if name not in available]
    fallback = f"; {', '.join(missing)} without a promoted version: the base answers them" if missing else ""
    return Decision(True, f"router held-out accuracy {accuracy:.4f} >= {min_accuracy:.4f}{fallback}")


def adapter_shape_problems(
    adapter: dict[str, tuple[int, ...]], base: dict[str, tuple[int, ...]], rank: int
) -> list[str]:
    """Mismatches between a PEFT LoRA state dict's shapes and the base's linear weights:
    lora_A must be [rank, in_features] and lora_B [out_features, rank] of the module it wraps."""
    problems: list[str] = []
    lora_keys = 0
    for key, shape in sorted(adapter.items()):
        part = next((p for suffix, p in LORA_SUFFIXES.items() if key.endswith(suffix)), None)
        if part is None:
            continue
        lora_keys += 1
        module = key.removeprefix(PEFT_PREFIX)[: -len(".lora_A.weight")]
        target = base.get(module + ".weight")
        if target is None:
            problems.append(f"{key}: the base has no weight {module}.weight")
            continue
        out_features, in_features = target[0], target[-1]
        expected = (rank, in_features) if part == "A" else (out_features, rank)
        if tuple(shape) != expected:
            problems.append(f"{key}: shape {tuple(shape)} != expected {expected} for base {tuple(target)}")
    if lora_keys == 0:
        problems.append("the adapter holds no LoRA weights")
    return problems


def router_shape_problems(router: dict[str, Any], hidden_size: int, layers: int, experts: list[str]) -> list[str]:
    """A router's config against the base (feature width, layer range) and the spec's expert order."""
    problems = []
    if router["experts"] != experts:
        problems.append(f"router experts {router['experts']} != spec experts {experts}")
    if router.get("kind", "mlp") != "mlp":
        return problems  # a text router has no tie to the base's shapes
    if router["input_dim"] != hidden_size:
        problems.append(f"router input_dim {router['input_dim']} != base hidden_size {hidden_size}")
    if not 0 <= router["feature_layer"] <= layers:
        problems.append(f"router feature_layer {router['feature_layer']} outside 0..{layers}")
    return problems


def base_change_decision(base_changed: bool, experts: dict[str, Decision], serving: set[str]) -> Decision:
    """A new base is promoted only together with a passing version of every expert that has a promoted version
    (`serving`): a failed one would keep its old version, trained on the old base, and serving would pair the new
    base with it. An expert that never passed has nothing to keep coherent; it stays unpromoted (the base answers
    its domain) while the others move to the new base."""
    if not base_changed:
        return Decision(True, "base unchanged")
    blocking = sorted(name for name, decision in experts.items() if not decision.promote and name in serving)
    if blocking:
        return Decision(
            False,
            f"new base not promoted: experts {', '.join(blocking)} failed the gate; the current base keeps serving",
        )
    failed = sorted(name for name, decision in experts.items() if not decision.promote)
    if failed:
        return Decision(
            True, f"new base (the base answers where no expert passed): {', '.join(failed)} had no version to keep"
        )
    return Decision(True, "every expert passed on the new base")


def base_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why an adapter trained on base `recorded` may not be paired with base `current` (None when it may); both
    are base descriptions with `identity`, `model_type` and `hidden_size`, named in full in the message."""
    keys = ("model_type", "hidden_size", "identity")
    if all(recorded.get(key) == current.get(key) for key in keys):
        return None

    def show(desc: dict[str, Any]) -> str:
        return f"{desc.get('model_type')} hidden={desc.get('hidden_size')} id={str(desc.get('identity'))[:16]}"

    return f"trained on base [{show(recorded)}] but the served base is [{show(current)}]"
