"""Names the API and the stack's status use for themselves, so no expert may take them.

`base` and `auto` are model names of the serving API (`/v1/models`, `model`, `lora_adapter`);
`router`, `index` and `base` are keys of the server's version map, of the pod's active-versions
annotation and of the stack's `status.adapters`; `general` is the `/generate` domain of an answer the
base model gave. An expert with one of these names would be shadowed or listed twice, so the spec
loader, the CRD and the inference server all refuse it, from this one list."""

from __future__ import annotations

RESERVED_EXPERT_NAMES: frozenset[str] = frozenset({"auto", "base", "general", "index", "router"})
