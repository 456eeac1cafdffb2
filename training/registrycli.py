"""`latentmas registry …`: inspect the promoted artifacts and roll one back."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentmas.store import ObjectStore

ENDPOINT_ENV = "LATENTMAS_S3_ENDPOINT"


def register(subparsers: argparse._SubParsersAction) -> None:
    registry = subparsers.add_parser("registry", help="show promoted versions or roll one back")
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the registry: current versions, history, rejected candidates")
    _storage_args(show)
    show.add_argument("--raw", action="store_true", help="print registry.json as stored")
    show.set_defaults(handler=_show)
    back = actions.add_parser(
        "rollback",
        help="point an expert (or router/index/base) at its previous version",
        description="Restores the previous promoted version with one registry.json write; history is kept.",
    )
    back.add_argument("name", help="expert name (or 'router', 'index', 'base' with --kind)")
    back.add_argument("--kind", choices=["expert", "router", "index", "base"], default="expert")
    _storage_args(back)
    back.set_defaults(handler=_rollback)


def _storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack", required=True, help="LatentMASStack name")
    parser.add_argument("--namespace", default="default", help="stack namespace (default: default)")
    parser.add_argument(
        "--endpoint",
        default=os.environ.get(ENDPOINT_ENV, "minio:9000"),
        help=f"S3 host:port or file:///path (default: ${ENDPOINT_ENV} or minio:9000); "
        "credentials from LATENTMAS_S3_ACCESS_KEY/LATENTMAS_S3_SECRET_KEY",
    )
    parser.add_argument("--secure", action="store_true", help="use TLS")
    parser.add_argument("--bucket", default="artifacts", help="artifacts bucket (default: artifacts)")


def _store(args: argparse.Namespace) -> ObjectStore:
    from latentmas.spec import StorageSpec
    from latentmas.store import open_store

    store = open_store(StorageSpec(endpoint=args.endpoint, secure=args.secure, artifacts_bucket=args.bucket))
    if not store.bucket_exists(args.bucket):
        raise LookupError(f"bucket {args.bucket!r} does not exist at {args.endpoint}")
    return store


def _existing_registry(store: ObjectStore, args: argparse.Namespace) -> None:
    """Refuses a stack with no registry.json: an empty registry would read as "nothing promoted" when the
    --stack or --namespace is mistyped."""
    from latentmas.registry import registry_key

    key = registry_key(args.namespace, args.stack)
    if not store.exists(args.bucket, key):
        raise LookupError(
            f"no registry exists at {args.bucket}/{key} (wrong --stack/--namespace, or nothing promoted yet)"
        )


def _show(args: argparse.Namespace) -> int:
    from latentmas.registry import load_registry
    from latentmas.training.registryops import summary

    store = _store(args)
    _existing_registry(store, args)
    registry = load_registry(store, args.bucket, args.namespace, args.stack)
    data = registry.model_dump(mode="json") if args.raw else summary(registry)
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from latentmas.registry import load_registry
    from latentmas.training.registryops import entry_of, rollback

    store = _store(args)
    _existing_registry(store, args)
    before = entry_of(load_registry(store, args.bucket, args.namespace, args.stack), args.kind, args.name).current
    registry = rollback(store, args.bucket, args.namespace, args.stack, args.name, args.kind)
    after = entry_of(registry, args.kind, args.name).current
    result = {"kind": args.kind, "name": args.name, "from": before, "to": after, "revision": registry.revision}
    print(json.dumps(result))
    return 0
