"""Pure promotion decisions: does a candidate beat what it would replace, and do its tensor shapes fit
the base? No I/O here, so every rule is unit-testable with plain dicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def expert_decision(entry: dict[str, Any], margin: float) -> Decision:
    """Promote when the candidate's held-out loss is below its reference by a relative `margin`: the
    promoted predecessor when one is comparable, else the base (a first version must beat the base)."""
    candidate = float(entry["expert"]["loss"])
    promoted = entry.get("promoted")
    if promoted is not None:
        reference, label = float(promoted["loss"]), f"promoted v{promoted['version']}"
    else:
        reference, label = float(entry["base"]["loss"]), "the base"
    needed = reference * (1.0 - margin)
    if candidate < needed:
        return Decision(True, f"held-out loss {candidate:.4f} < {label} {reference:.4f} (margin {margin:.2%})")
    return Decision(
        False, f"held-out loss {candidate:.4f} does not beat {label} {reference:.4f} by the {margin:.2%} margin"
    )


def router_decision(accuracy: float, min_accuracy: float, experts: list[str], available: set[str]) -> Decision:
    """A router is promoted when accurate enough and every expert it routes to has a promoted version."""
    missing = [name for name in experts if name not in available]
    if missing:
        return Decision(False, f"router routes to experts without a promoted version: {', '.join(missing)}")
    if accuracy < min_accuracy:
        return Decision(False, f"router held-out accuracy {accuracy:.4f} < required {min_accuracy:.4f}")
    return Decision(True, f"router held-out accuracy {accuracy:.4f} >= {min_accuracy:.4f}")


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
    if router["input_dim"] != hidden_size:
        problems.append(f"router input_dim {router['input_dim']} != base hidden_size {hidden_size}")
    if not 0 <= router["feature_layer"] <= layers:
        problems.append(f"router feature_layer {router['feature_layer']} outside 0..{layers}")
    if router["experts"] != experts:
        problems.append(f"router experts {router['experts']} != spec experts {experts}")
    return problems


def base_change_decision(base_changed: bool, experts: dict[str, Decision]) -> Decision:
    """A new base is promoted only together with a passing version of every expert: a failed expert would keep
    its old version, trained on the old base, and serving would pair the new base with it."""
    if not base_changed:
        return Decision(True, "base unchanged")
    failed = sorted(name for name, decision in experts.items() if not decision.promote)
    if failed:
        return Decision(
            False, f"new base not promoted: experts {', '.join(failed)} failed the gate; the current base keeps serving"
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
