"""The LatentMASStack CustomResourceDefinition, generated from the spec models (DESIGN §3).

pydantic's JSON schema is turned into a Kubernetes structural schema: references inlined, `X | None`
as `nullable`, defaults (including `default_factory` ones, so the API server fills them in), CEL rules
from the models' `x-kubernetes-validations`, plus the cross-section rules below."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from latentmas.crddocs import FIELD_DESCRIPTIONS
from latentmas.cycle import DEPENDENCIES
from latentmas.spec import GROUP, KIND, PLURAL, VERSION, LatentMASStackSpec, StackStatus
from pydantic import BaseModel, TypeAdapter

SINGULAR = "latentmasstack"
SHORT_NAMES = ["lms"]
MAX_STACK_NAME = 40
DROPPED_KEYS = ("title", "additionalProperties", "$defs")

# Kubernetes name syntaxes, written without backslashes so the same text works in CEL string literals.
DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = f"^{DNS_LABEL}([.]{DNS_LABEL})*$"
QUALIFIED_NAME = f"^({DNS_LABEL}([.]{DNS_LABEL})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE = "^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
SECRET_KEY = "^[-._a-zA-Z0-9]+$"
EXTENDED_RESOURCE = f"^{DNS_LABEL}([.]{DNS_LABEL})+/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
TIME_ZONE_AREAS = (
    "Africa|America|Antarctica|Arctic|Asia|Atlantic|Australia|Europe|Indian|Pacific|Etc|US|Canada|Brazil|Chile|Mexico"
)
TIME_ZONE = f"^(UTC|GMT|({TIME_ZONE_AREAS})/[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)?)$"
MAX_MAP_ENTRIES = 64


def _cron_pattern() -> str:
    """Five fields with their value ranges (names, lists, ranges, steps), or a descriptor."""

    def field(value: str) -> str:
        item = rf"(\*|\?|({value})(-({value}))?)(/[1-9][0-9]?)?"
        return f"{item}(,{item})*"

    months = "0?[1-9]|1[0-2]|jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec"
    fields = [
        field("[0-5]?[0-9]"),
        field("[01]?[0-9]|2[0-3]"),
        field("0?[1-9]|[12][0-9]|3[01]"),
        field(months),
        field("[0-7]|sun|mon|tue|wed|thu|fri|sat"),
    ]
    return r"(?i)^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|" + r"\s+".join(fields) + ")$"


def _map_rules(what: str, label_values: bool) -> dict[str, Any]:
    """A bounded string map whose keys are qualified names (labels, annotations); label values by pattern."""
    rule = f"self.all(k, k.matches('{QUALIFIED_NAME}'))"
    message = f"{what} keys must be qualified names ([prefix/]name, name at most 63 characters)"
    values: dict[str, Any] = {"type": "string", "maxLength": 63 if label_values else 65536}
    if label_values:
        values["pattern"] = LABEL_VALUE
    return {
        "maxProperties": MAX_MAP_ENTRIES,
        "additionalProperties": values,
        "x-kubernetes-validations": [{"rule": rule, "message": message}],
    }


IMAGE = {"minLength": 1, "pattern": r"^\S+$"}
# Schema added to single fields, by (model name, wire name): what Kubernetes would refuse in a child.
FIELD_SCHEMA: dict[tuple[str, str], dict[str, Any]] = {
    ("SecretKeyRef", "name"): {"pattern": DNS_SUBDOMAIN, "maxLength": 253},
    ("SecretKeyRef", "accessKeyKey"): {"pattern": SECRET_KEY, "maxLength": 253},
    ("SecretKeyRef", "secretKeyKey"): {"pattern": SECRET_KEY, "maxLength": 253},
    ("InferenceSpec", "authSecretRef"): {"pattern": DNS_SUBDOMAIN, "maxLength": 253},
    ("InferenceSpec", "image"): IMAGE,
    ("TrainingSpec", "image"): IMAGE,
    ("ScheduleSpec", "cron"): {"pattern": _cron_pattern(), "maxLength": 200},
    ("ScheduleSpec", "timeZone"): {"pattern": TIME_ZONE, "maxLength": 64},
    ("Toleration", "key"): {"pattern": QUALIFIED_NAME, "maxLength": 316},
    ("Toleration", "value"): {"pattern": LABEL_VALUE, "maxLength": 63},
    ("LatentMASStackSpec", "nodeSelector"): _map_rules("nodeSelector", label_values=True),
    ("LatentMASStackSpec", "stagePodAnnotations"): _map_rules("stagePodAnnotations", label_values=False),
    ("LatentMASStackSpec", "stages"): {"maxProperties": 16},
    ("LatentMASStackSpec", "priorityClassName"): {"pattern": DNS_SUBDOMAIN},
    ("LatentMASStackSpec", "imagePullSecrets"): {
        "items": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253}
    },
    ("StageRetry", "nodeSelector"): _map_rules("nodeSelector", label_values=True),
    ("Resources", "gpuResourceName"): {"maxLength": 253},
    ("StorageSpec", "endpoint"): {"maxLength": 2048},
}
NEVER_FIRES = [
    "^[^ ]+ +[^ ]+ +(0?[0-9]+,)*3[01](,[0-9]+)* +(0?2|feb|FEB|Feb) +[*?]$",
    "^[^ ]+ +[^ ]+ +31 +(0?[469]|11|apr|jun|sep|nov|APR|JUN|SEP|NOV|Apr|Jun|Sep|Nov) +[*?]$",
]


# CEL rules for sections owned elsewhere, keyed by their model name.
EXTRA_RULES: dict[str, list[dict[str, str]]] = {
    "CleaningSpec": [
        {"rule": "self.chunkOverlap < self.chunkChars", "message": "chunkOverlap must be smaller than chunkChars"}
    ],
    "StorageSpec": [
        {
            "rule": "!self.endpoint.startsWith('file://')",
            "message": "endpoint: file:// stores are for local runs only; in a cluster use an S3 endpoint host:port",
            "fieldPath": ".endpoint",
        }
    ],
    "Resources": [
        {
            "rule": f"self.gpuResourceName.matches('{EXTENDED_RESOURCE}')",
            "message": "gpuResourceName must be an extended resource (domain/name, e.g. nvidia.com/gpu), "
            "not a core resource such as cpu or memory",
            "fieldPath": ".gpuResourceName",
        }
    ],
    "ScheduleSpec": [
        {
            "rule": " && ".join(f"!self.cron.matches('{p}')" for p in NEVER_FIRES),
            "message": "cron never fires: that day does not exist in that month",
            "fieldPath": ".cron",
        }
    ],
    "Toleration": [
        {
            "rule": "has(self.key) || self.operator == 'Exists'",
            "message": "operator must be Exists when key is empty",
        }
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
# Defaults the API server must not write into stored objects: an image left unset follows the operator's
# release (its models' default) instead of freezing the release that created the stack (version skew).
NOT_DEFAULTED_IN_CRD: frozenset[tuple[str, str]] = frozenset({("InferenceSpec", "image"), ("TrainingSpec", "image")})
# Fields a stack must set in-cluster although Python callers get a default (the local store needs no Secret).
REQUIRED_IN_CRD: dict[str, tuple[str, ...]] = {"LatentMASStackSpec": ("storage",)}
# Lists whose items are unique by a key (the API server enforces it and merges them by that key).
LIST_MAP_KEYS: dict[tuple[str, str], str] = {
    ("LatentMASStackSpec", "experts"): "name",
    ("StackStatus", "conditions"): "type",
}


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
        dumped = TypeAdapter(info.annotation or Any).dump_python(value, mode="json", by_alias=True, exclude_none=True)
        nested = _nested_models(info.annotation)
        defaults[alias] = _unfrozen(dumped, nested[0]) if nested and isinstance(dumped, dict) else dumped
    return defaults


def _unfrozen(value: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """A default object without the fields in `NOT_DEFAULTED_IN_CRD` (at any depth)."""
    out = dict(value)
    for name, info in model.model_fields.items():
        alias = info.alias or name
        if (model.__name__, alias) in NOT_DEFAULTED_IN_CRD:
            out.pop(alias, None)
        elif isinstance(out.get(alias), dict) and (nested := _nested_models(info.annotation)):
            out[alias] = _unfrozen(out[alias], nested[0])
    return out


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
        for owner, field in NOT_DEFAULTED_IN_CRD:
            if owner == model_name:
                out["properties"][field].pop("default", None)
        for field in REQUIRED_IN_CRD.get(model_name, ()):
            out["properties"][field].pop("default", None)
            out["required"] = sorted({*out.get("required", []), field})
        for (owner, field), key in LIST_MAP_KEYS.items():
            if owner == model_name:
                out["properties"][field]["x-kubernetes-list-type"] = "map"
                out["properties"][field]["x-kubernetes-list-map-keys"] = [key]
        for (owner, field), text in FIELD_DESCRIPTIONS.items():
            if owner == model_name and not out["properties"][field].get("description"):
                out["properties"][field]["description"] = text
        for (owner, field), extra in FIELD_SCHEMA.items():
            if owner == model_name:
                target = out["properties"][field]
                target.update({k: v for k, v in extra.items() if k != "x-kubernetes-validations"})
                if "x-kubernetes-validations" in extra:
                    target["x-kubernetes-validations"] = extra["x-kubernetes-validations"]
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
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
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
