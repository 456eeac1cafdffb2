"""`latentmas serve`: run the inference server for one stack (what the inference Deployment runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a stack's base model and experts (OpenAI-compatible API, hot reload from the registry)",
        description=(
            "Loads the base model named by the stack's registry, serves every promoted expert from one batch, "
            "and follows registry.json for new versions. The config file holds {namespace, stack, spec} "
            "(spec in the LatentMASStack camelCase form)."
        ),
    )
    serve.add_argument("--config", required=True, type=Path, help="JSON/YAML file: {namespace, stack, spec}")
    serve.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=None, help="port (default: spec.inference.port)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    serve.add_argument("--cache-dir", type=Path, default=None, help="download folder (default $LATENTMAS_CACHE)")
    serve.set_defaults(handler=_serve)


def _load(path: Path) -> dict[str, Any]:
    from latentmas.localrun import load_document

    data = load_document(path, f"--config {path}")
    if not isinstance(data, dict) or "stack" not in data or "spec" not in data:
        raise ValueError(f"--config {path}: expected a mapping with 'stack' and 'spec' (and optionally 'namespace')")
    return data


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from latentmas.services.app import create_app
    from latentmas.services.settings import ServeSettings
    from latentmas.spec import LatentMASStackSpec
    from pydantic import ValidationError

    data = _load(args.config)
    try:
        spec = LatentMASStackSpec.model_validate(data["spec"])
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(['spec', *(str(p) for p in e['loc'])])}: {e['msg']}" for e in err.errors())
        raise ValueError(f"--config {args.config}: {problems}") from None
    problem = device_problem(args.device)
    if problem:
        raise ValueError(f"--device {args.device}: {problem}")
    overrides: dict[str, object] = {"device": args.device}
    if args.cache_dir is not None:
        overrides["cache_dir"] = args.cache_dir
    settings = ServeSettings.from_spec(data.get("namespace", "default"), data["stack"], spec, **overrides)
    port = args.port or spec.inference.port
    print(f"serving stack {settings.namespace}/{settings.stack} on http://{args.host}:{port} (GET /ready)")
    uvicorn.run(create_app(settings), host=args.host, port=port, log_level="info")
    return 0


def device_problem(device: str) -> str | None:
    """Why `--device` cannot serve on this machine, or None: found at start, not by a server that retries its
    model load forever while /ready answers 503."""
    if device in ("auto", "cpu"):
        return None
    name, _, index = device.partition(":")
    if name != "cuda" or (index and not index.isdigit()):
        return "unknown device; use auto, cpu, cuda or cuda:N"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "torch sees no CUDA device on this machine; use cpu or auto"
    if index and int(index) >= count:
        return f"this machine has {count} CUDA device(s), numbered from 0"
    return None
