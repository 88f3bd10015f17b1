"""Where a store lives: a local folder, an object-storage prefix or a read-only HTTP URL.

Every byte erstore writes goes through TensorStore's kvstore drivers, so the same code reads
and writes local disk and object storage. `Location` wraps one kvstore rooted at the store and
offers the few verbs the engine needs: read, write, write-if-absent (the commit primitive), list
and delete. It does not cache and it holds no locks: consistency comes from immutable objects
plus one conditional write per commit (see `erstore.writer`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorstore as ts

from erstore.errors import ErstoreError, StorePermissionError

# The generation TensorStore reports for a key that does not exist; writing with
# if_equal=_NO_VALUE succeeds only if the key is still absent.
_NO_VALUE = b"\x02"


def kvstore_spec(url: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Translate a path or URL into a TensorStore kvstore spec rooted at the store."""
    text = os.fspath(url)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": _dir(prefix)}
        endpoint = options.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        spec["aws_region"] = options.get("region") or os.environ.get("AWS_REGION", "us-east-1")
        spec["aws_credentials"] = {"type": "environment"}
        return spec
    if text.startswith(("http://", "https://")):
        return {"driver": "http", "base_url": text.rstrip("/") + "/"}
    if "://" in text:
        raise ErstoreError(f"unsupported store URL {text!r}: use a local path, s3:// or http(s)://")
    return {"driver": "file", "path": _dir(str(Path(text).expanduser().resolve()))}


def _dir(path: str) -> str:
    return path if not path or path.endswith("/") else path + "/"


@dataclass(frozen=True)
class Location:
    """A kvstore rooted at one store; keys are relative paths like ``versions/00000001.json``."""

    url: str
    spec: dict[str, Any]
    kv: ts.KvStore

    @classmethod
    def open(cls, url: str | os.PathLike[str], **options: Any) -> Location:
        spec = kvstore_spec(url, **options)
        return cls(os.fspath(url), spec, ts.KvStore.open(spec).result())

    @property
    def is_local(self) -> bool:
        return self.spec["driver"] == "file"

    @property
    def read_only(self) -> bool:
        return self.spec["driver"] == "http"

    def child_spec(self, relpath: str) -> dict[str, Any]:
        """The kvstore spec of a sub-folder, for opening a zarr array inside the store."""
        return {**self.spec, "path": self.spec.get("path", "") + _dir(relpath)} if "path" in self.spec else {
            **self.spec, "base_url": self.spec["base_url"] + _dir(relpath)}

    def read(self, key: str) -> bytes | None:
        """Return the value of `key`, or None if it does not exist."""
        result = self.kv.read(key).result()
        return result.value if result.state == "value" else None

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """Read several keys concurrently."""
        futures = [self.kv.read(k) for k in keys]
        return [r.value if r.state == "value" else None for r in (f.result() for f in futures)]

    def write(self, key: str, value: bytes) -> None:
        try:
            self.kv.write(key, value).result()
        except ValueError as e:
            raise self._write_error(key, e) from e

    def write_if_absent(self, key: str, value: bytes) -> bool:
        """Write `key` only if it does not exist yet; return False if someone else has it."""
        try:
            stamp = self.kv.write(key, value, if_equal=_NO_VALUE).result()
        except ValueError as e:
            raise self._write_error(key, e) from e
        return bool(stamp.generation)

    def check_writable(self) -> None:
        """Fail early, before any compute, if the store location cannot be written."""
        if self.read_only:
            raise StorePermissionError(f"{self.url} is served over HTTP and is read-only")
        if self.is_local:
            root = Path(self.spec["path"])
            try:
                root.mkdir(parents=True, exist_ok=True)
                probe = root / f".probe-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise StorePermissionError(
                    f"cannot write to store path {root}: {e.strerror}; choose a writable --store"
                ) from e

    def _write_error(self, key: str, e: Exception) -> StorePermissionError:
        return StorePermissionError(
            f"cannot write {key!r} under {self.url}: {e}; check that the store location exists, "
            "is writable and (for object storage) that the bucket and credentials are right"
        )

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted."""
        if self.read_only:
            raise ErstoreError(f"{self.url} is served over HTTP, which cannot list keys")
        if prefix:
            keys = self.kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()
        else:
            keys = self.kv.list().result()
        return sorted(k.decode() for k in keys)

    def delete_prefix(self, prefix: str) -> None:
        self.kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()
        if self.is_local:  # the file driver leaves empty folders behind
            folder = Path(self.spec["path"]) / prefix
            for sub in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def size_of_prefix(self, prefix: str) -> int:
        """Bytes stored under `prefix` (local stat where possible, else by reading)."""
        if self.is_local:
            root = Path(self.spec["path"]) / prefix
            return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
        keys = self.list(prefix)
        return sum(len(v or b"") for v in self.read_many(keys))
