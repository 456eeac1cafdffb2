"""The LatentMASStack CustomResourceDefinition, generated from the spec models (DESIGN §3).

pydantic's JSON schema is turned into a Kubernetes structural schema: references inlined, `X | None`
as `nullable`, defaults (including `default_factory` ones, so the API server fills them in), CEL rules
from the models' `x-kubernetes-validations`, plus the cross-section rules below."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from latentmas.cycle import DEPENDENCIES
from latentmas.spec import GROUP, KIND, PLURAL, VERSION, LatentMASStackSpec, StackStatus
from pydantic import BaseModel, TypeAdapter

SINGULAR = "latentmasstack"
SHORT_NAMES = ["lms"]
MAX_STACK_NAME = 40
DROPPED_KEYS = ("title", "additionalProperties", "$defs")

# CEL rules for sections owned elsewhere, keyed by their model name.
EXTRA_RULES: dict[str, list[dict[str, str]]] = {
    "CleaningSpec": [
        {"rule": "self.chunkOverlap < self.chunkChars", "message": "chunkOverlap must be smaller than chunkChars"}
    ],
    "LatentMASStackSpec": [
        {
            "rule": "self.stages.all(s, s in [" + ", ".join(f"'{s}'" for s in DEPENDENCIES) + "])",
            "message": "stages keys must be stage names: " + ", ".join(DEPENDENCIES),
        },
        {
            "rule": "self.experts.all(e, self.experts.exists_one(f, f.domain == e.domain))",
            "message": "experts must have distinct domains",
            "fieldPath": ".experts",
        },
    ],
}
# Fields a stack must set in-cluster although Python callers get a default (the local store needs no Secret).
REQUIRED_IN_CRD: dict[str, tuple[str, ...]] = {"LatentMASStackSpec": ("storage",)}
# Lists whose items are unique by a key (the API server enforces it and merges them by that key).
LIST_MAP_KEYS: dict[tuple[str, str], str] = {("LatentMASStackSpec", "experts"): "name"}


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from `root`, by class name (the key pydantic uses in `$defs`)."""
    found: dict[str, type[BaseModel]] = {}
    stack = [root]
    while stack:
        model = stack.pop()
        if model.__name__ in found:
            continue
        found[model.__name__] = model
        for info in model.model_fields.values():
            stack.extend(_nested_models(info.annotation))
    return found


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _nested_models(arg)]


def _factory_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Wire-format defaults of fields built by `default_factory` (pydantic leaves them out of the schema)."""
    defaults: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.default_factory is None:
            continue
        value = info.default_factory()  # type: ignore[call-arg]
        alias = info.alias or name
        defaults[alias] = TypeAdapter(info.annotation or Any).dump_python(
            value, mode="json", by_alias=True, exclude_none=True
        )
    return defaults


class _Converter:
    def __init__(self, root: type[BaseModel]) -> None:
        self.schema = root.model_json_schema(by_alias=True)
        self.defs: dict[str, Any] = self.schema.get("$defs", {})
        self.models = _models(root)
        self.root_name = root.__name__

    def convert(self) -> dict[str, Any]:
        return self._node(self.schema, self.root_name)

    def _node(self, node: dict[str, Any], model_name: str | None = None) -> dict[str, Any]:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            merged = {**self.defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
            return self._node(merged, name)
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            if len(options) != 1:
                raise ValueError(f"unsupported union in schema: {node}")
            nullable = self._node({**options[0], **rest})
            nullable["nullable"] = True
            return nullable
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in DROPPED_KEYS or (key == "default" and value is None):
                continue
            if key == "const":
                out["enum"] = [value]
            elif key == "exclusiveMinimum":
                out["minimum"], out["exclusiveMinimum"] = value, True
            elif key == "exclusiveMaximum":
                out["maximum"], out["exclusiveMaximum"] = value, True
            elif key == "properties":
                out["properties"] = {k: self._node(v) for k, v in value.items()}
            elif key == "items":
                out["items"] = self._node(value)
            else:
                out[key] = copy.deepcopy(value)
        if "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
            out["additionalProperties"] = self._node(node["additionalProperties"])
        if model_name is not None:
            self._decorate(out, model_name)
        return out

    def _decorate(self, out: dict[str, Any], model_name: str) -> None:
        model = self.models[model_name]
        out["type"] = "object"
        for alias, default in _factory_defaults(model).items():
            out["properties"][alias]["default"] = default
        for field in REQUIRED_IN_CRD.get(model_name, ()):
            out["properties"][field].pop("default", None)
            out["required"] = sorted({*out.get("required", []), field})
        for (owner, field), key in LIST_MAP_KEYS.items():
            if owner == model_name:
                out["properties"][field]["x-kubernetes-list-type"] = "map"
                out["properties"][field]["x-kubernetes-list-map-keys"] = [key]
        rules = [*out.pop("x-kubernetes-validations", []), *EXTRA_RULES.get(model_name, [])]
        if rules:
            out["x-kubernetes-validations"] = rules


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A structural OpenAPI v3 schema of one pydantic model."""
    return _Converter(model).convert()


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Cycle", "type": "string", "jsonPath": ".status.cycle.id"},
        {"name": "Last", "type": "string", "jsonPath": ".status.lastCycle.state", "priority": 1},
        {"name": "Experts", "type": "string", "jsonPath": ".status.expertsReady", "description": "ready/total"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    columns = _printer_columns()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "latentmas"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": PLURAL,
                "singular": SINGULAR,
                "kind": KIND,
                "listKind": f"{KIND}List",
                "shortNames": SHORT_NAMES,
                "categories": ["latentmas"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A team of LoRA experts that keeps learning from the team's data.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": openapi_schema(LatentMASStackSpec),
                                "status": openapi_schema(StackStatus),
                            },
                            "x-kubernetes-validations": [
                                {
                                    "rule": f"self.metadata.name.size() <= {MAX_STACK_NAME}",
                                    "message": f"metadata.name must be at most {MAX_STACK_NAME} characters",
                                }
                            ],
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The checked-in `crds/latentmasstack.yaml` text (`latentmas crd` prints it)."""
    header = "# Generated by `latentmas crd` from latentmas.spec; do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
