"""The one object-store client: S3 (MinIO) in-cluster and in tests, a folder for the local demo.

Stages, training, the registry and the inference service all talk to storage through `ObjectStore`,
so a stage behaves the same against MinIO and against the embedded filesystem store.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from latentmas.spec import StorageSpec

ACCESS_KEY_ENV = "LATENTMAS_S3_ACCESS_KEY"
SECRET_KEY_ENV = "LATENTMAS_S3_SECRET_KEY"


class StoreError(RuntimeError):
    """A storage failure, with the bucket/key it concerns in the message."""


class ObjectNotFound(StoreError):
    pass


class PreconditionFailed(StoreError):
    """A conditional write found the object changed (or present/absent) since it was read."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class ObjectStore(Protocol):
    def ensure_bucket(self, bucket: str) -> None: ...
    def bucket_exists(self, bucket: str) -> bool: ...
    def put_bytes(self, bucket: str, key: str, data: bytes) -> str: ...
    def get_bytes(self, bucket: str, key: str) -> bytes: ...
    def put_file(self, bucket: str, key: str, path: Path) -> str: ...
    def get_file(self, bucket: str, key: str, path: Path) -> None: ...
    def stat(self, bucket: str, key: str) -> ObjectInfo: ...
    def exists(self, bucket: str, key: str) -> bool: ...
    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, bucket: str, key: str) -> None: ...
    def get_with_etag(self, bucket: str, key: str) -> tuple[bytes, str]: ...
    def iter_bytes(self, bucket: str, key: str, block: int) -> Iterator[bytes]: ...
    def put_bytes_if(self, bucket: str, key: str, data: bytes, etag: str | None) -> str: ...


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_object(store: ObjectStore, bucket: str, key: str, block: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a stored object, read in `block`-byte pieces so that checksumming
    a multi-GB stage output never holds it in memory."""
    digest = hashlib.sha256()
    size = 0
    for piece in store.iter_bytes(bucket, key, block):
        digest.update(piece)
        size += len(piece)
    return size, digest.hexdigest()


def delete_prefix(store: ObjectStore, bucket: str, prefix: str) -> int:
    keys = [info.key for info in store.list(bucket, prefix)]
    for key in keys:
        store.delete(bucket, key)
    return len(keys)


class LocalStore:
    """Buckets are folders under `root`; writes go through a temp file and a rename, so readers
    never see a half-written object (the same guarantee S3 gives)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, bucket: str, key: str) -> Path:
        if not key or key.startswith("/") or ".." in Path(key).parts:
            raise StoreError(f"invalid object key {key!r} in bucket {bucket!r}")
        return self.root / bucket / key

    def _bucket(self, bucket: str) -> Path:
        path = self.root / bucket
        if not path.is_dir():
            raise ObjectNotFound(f"bucket {bucket!r} does not exist under {self.root}")
        return path

    def ensure_bucket(self, bucket: str) -> None:
        (self.root / bucket).mkdir(parents=True, exist_ok=True)

    def bucket_exists(self, bucket: str) -> bool:
        return (self.root / bucket).is_dir()

    def put_bytes(self, bucket: str, key: str, data: bytes) -> str:
        self._bucket(bucket)
        target = self._path(bucket, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
        return hashlib.md5(data).hexdigest()

    def get_bytes(self, bucket: str, key: str) -> bytes:
        path = self._path(bucket, key)
        if not path.is_file():
            raise ObjectNotFound(f"object {bucket}/{key} not found")
        return path.read_bytes()

    def get_with_etag(self, bucket: str, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(bucket, key)
        return data, hashlib.md5(data).hexdigest()

    def iter_bytes(self, bucket: str, key: str, block: int) -> Iterator[bytes]:
        """The object's bytes in blocks of at most `block` (memory bounded by one block)."""
        path = self._path(bucket, key)
        if not path.is_file():
            raise ObjectNotFound(f"object {bucket}/{key} not found")
        with path.open("rb") as handle:
            yield from iter(lambda: handle.read(block), b"")

    @contextmanager
    def _locked(self, bucket: str, key: str) -> Iterator[None]:
        """An exclusive lock per object (a lock file outside every bucket), held across processes."""
        lock = self.root / ".locks" / bucket / (key + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put_bytes_if(self, bucket: str, key: str, data: bytes, etag: str | None) -> str:
        """Writes only if the object's content hash is still `etag` (None: only if it does not exist)."""
        with self._locked(bucket, key):
            path = self._path(bucket, key)
            current = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None
            if current != etag:
                raise PreconditionFailed(
                    f"object {bucket}/{key} changed since it was read "
                    f"(expected {etag or 'absent'}, found {current or 'absent'})"
                )
            return self.put_bytes(bucket, key, data)

    def put_file(self, bucket: str, key: str, path: Path) -> str:
        return self.put_bytes(bucket, key, path.read_bytes())

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        source = self._path(bucket, key)
        if not source.is_file():
            raise ObjectNotFound(f"object {bucket}/{key} not found")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        data = self.get_bytes(bucket, key)
        return ObjectInfo(key, len(data), hashlib.md5(data).hexdigest())

    def exists(self, bucket: str, key: str) -> bool:
        return self._path(bucket, key).is_file()

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._bucket(bucket)
        for path in sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")):
            key = path.relative_to(base).as_posix()
            if key.startswith(prefix):
                yield ObjectInfo(key, path.stat().st_size, "")

    def delete(self, bucket: str, key: str) -> None:
        self._path(bucket, key).unlink(missing_ok=True)


class S3Store:
    """S3 through the MinIO SDK; errors name the endpoint, bucket and key."""

    def __init__(
        self, endpoint: str, access_key: str, secret_key: str, secure: bool, region: str, http_client: Any = None
    ) -> None:
        """`http_client`: a urllib3 PoolManager with the caller's timeouts and retries (the SDK default
        waits minutes on an endpoint that accepts connections but never answers)."""
        from minio import Minio

        self.endpoint = endpoint
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http_client,
        )

    def _call(self, what: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                raise ObjectNotFound(f"{what}: {err.code}") from err
            raise StoreError(f"{what}: {err.code}: {err.message}") from err
        except (HTTPError, OSError) as err:
            raise StoreError(f"{what}: object store at {self.endpoint} unreachable ({err})") from err

    def ensure_bucket(self, bucket: str) -> None:
        if not self.bucket_exists(bucket):
            self._call(f"creating bucket {bucket}", self.client.make_bucket, bucket)

    def bucket_exists(self, bucket: str) -> bool:
        return bool(self._call(f"bucket {bucket}", self.client.bucket_exists, bucket))

    def put_bytes(self, bucket: str, key: str, data: bytes) -> str:
        import io

        result = self._call(f"writing {bucket}/{key}", self.client.put_object, bucket, key, io.BytesIO(data), len(data))
        return str(result.etag)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        response = self._call(f"reading {bucket}/{key}", self.client.get_object, bucket, key)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def get_with_etag(self, bucket: str, key: str) -> tuple[bytes, str]:
        response = self._call(f"reading {bucket}/{key}", self.client.get_object, bucket, key)
        try:
            return bytes(response.read()), str(response.headers.get("ETag", "")).strip('"')
        finally:
            response.close()
            response.release_conn()

    def iter_bytes(self, bucket: str, key: str, block: int) -> Iterator[bytes]:
        """The object's bytes in blocks of at most `block`, streamed from the server."""
        response = self._call(f"reading {bucket}/{key}", self.client.get_object, bucket, key)
        try:
            yield from response.stream(block)
        finally:
            response.close()
            response.release_conn()

    def put_bytes_if(self, bucket: str, key: str, data: bytes, etag: str | None) -> str:
        """A conditional PUT: `If-Match: <etag>`, or `If-None-Match: *` when the object must not exist."""
        from minio.error import S3Error

        header = {"If-Match": f'"{etag}"'} if etag is not None else {"If-None-Match": "*"}
        try:
            # put_object would turn unknown headers into user metadata; the plain PUT keeps them conditions.
            result = self._call(f"writing {bucket}/{key}", self.client._put_object, bucket, key, data, header)
        except StoreError as err:
            cause = err.__cause__
            conflict = isinstance(cause, S3Error) and cause.code in ("PreconditionFailed", "ConditionalRequestConflict")
            if conflict or (isinstance(err, ObjectNotFound) and etag is not None):
                raise PreconditionFailed(
                    f"object {bucket}/{key} changed since it was read (expected {etag or 'absent'})"
                ) from err
            raise
        return str(result.etag)

    def put_file(self, bucket: str, key: str, path: Path) -> str:
        result = self._call(f"writing {bucket}/{key}", self.client.fput_object, bucket, key, str(path))
        return str(result.etag)

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(f"reading {bucket}/{key}", self.client.fget_object, bucket, key, str(path))

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        info = self._call(f"stat {bucket}/{key}", self.client.stat_object, bucket, key)
        return ObjectInfo(key, int(info.size or 0), str(info.etag))

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.stat(bucket, key)
        except ObjectNotFound:
            return False
        return True

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        objects = self._call(
            f"listing {bucket}/{prefix}",
            lambda: list(self.client.list_objects(bucket, prefix, recursive=True)),
        )
        for obj in objects:
            yield ObjectInfo(str(obj.object_name), int(obj.size or 0), str(obj.etag or ""))

    def delete(self, bucket: str, key: str) -> None:
        self._call(f"deleting {bucket}/{key}", self.client.remove_object, bucket, key)


def open_store(storage: StorageSpec) -> ObjectStore:
    """Opens the store a spec names; S3 credentials come from the environment (a Secret in-cluster)."""
    if storage.endpoint.startswith("file://"):
        return LocalStore(Path(storage.endpoint.removeprefix("file://")))
    access_key, secret_key = os.environ.get(ACCESS_KEY_ENV), os.environ.get(SECRET_KEY_ENV)
    if not access_key or not secret_key:
        raise StoreError(
            f"storage.endpoint {storage.endpoint}: credentials missing; set {ACCESS_KEY_ENV} and {SECRET_KEY_ENV}"
        )
    return S3Store(storage.endpoint, access_key, secret_key, storage.secure, storage.region)
