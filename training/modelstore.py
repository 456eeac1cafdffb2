"""Moving model folders (base models, adapters, checkpoints) between object storage and local disk.

Every file travels with its sha256; downloads are verified and land in a content-addressed cache, so a
base model is fetched once per machine however many stages use it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from latentmas.store import ObjectStore, StoreError, sha256_file

CACHE_ENV = "LATENTMAS_CACHE_DIR"


def cache_root() -> Path:
    """Where downloaded models live: $LATENTMAS_CACHE_DIR, else ~/.cache/latentmas."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentmas")


def folder_files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular, non-hidden file under `folder` (cache markers are hidden)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in paths}


def upload_folder(store: ObjectStore, bucket: str, prefix: str, folder: Path) -> dict[str, str]:
    """Uploads every file of `folder` under `prefix`; returns name -> sha256."""
    files = folder_files(folder)
    for name in files:
        store.put_file(bucket, prefix + name, folder / name)
    return files


def download_verified(store: ObjectStore, bucket: str, prefix: str, files: dict[str, str], dest: Path) -> None:
    """Downloads `files` from `prefix` into `dest`, failing on the first checksum mismatch."""
    for name, digest in files.items():
        target = dest / name
        store.get_file(bucket, prefix + name, target)
        actual = sha256_file(target)
        if actual != digest:
            raise StoreError(f"checksum mismatch for {bucket}/{prefix}{name}: expected {digest}, got {actual}")


def content_digest(files: dict[str, str]) -> str:
    """One digest for a set of files, independent of where they are stored."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def cached_folder(store: ObjectStore, bucket: str, prefix: str, files: dict[str, str], kind: str = "models") -> Path:
    """A local copy of a verified file set, downloaded only when the cache lacks it."""
    target = cache_root() / kind / content_digest(files)[:24]
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        download_verified(store, bucket, prefix, files, staging)
        (staging / ".complete").write_text(prefix)
        if not target.exists():
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def list_files(store: ObjectStore, bucket: str, prefix: str) -> list[str]:
    """Names (relative to `prefix`) of the objects below it."""
    return [info.key[len(prefix) :] for info in store.list(bucket, prefix) if not info.key.endswith("/")]


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/")."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket or not prefix:
        raise ValueError(f"invalid model URI {uri!r}: expected s3://bucket/prefix")
    return bucket, prefix.rstrip("/") + "/"


def fetch_prefix(store: ObjectStore, bucket: str, prefix: str) -> tuple[Path, dict[str, str]]:
    """Downloads a whole prefix (a model someone uploaded) once; later calls hit the cache while the
    objects' etags are unchanged. Returns the local folder and name -> sha256."""
    listing = sorted((info.key, info.etag, info.size) for info in store.list(bucket, prefix))
    if not listing:
        raise StoreError(f"no objects under {bucket}/{prefix}")
    index = (
        cache_root() / "sources" / (hashlib.sha256(json.dumps([bucket, listing]).encode()).hexdigest()[:24] + ".json")
    )
    if index.is_file():
        files: dict[str, str] = json.loads(index.read_text())
        folder = cache_root() / "models" / content_digest(files)[:24]
        if (folder / ".complete").is_file():
            return folder, files
    staging = Path(tempfile.mkdtemp(dir=_ensure(cache_root() / "models"), prefix=".partial-"))
    try:
        for key, _, _ in listing:
            store.get_file(bucket, key, staging / key[len(prefix) :])
        files = folder_files(staging)
        folder = cache_root() / "models" / content_digest(files)[:24]
        (staging / ".complete").write_text(prefix)
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _ensure(index.parent)
    index.write_text(json.dumps(files))
    return folder, files


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
