"""Where a store lives: a local folder, an object-storage prefix or a read-only HTTP URL.

Every byte erstore writes goes through TensorStore's kvstore drivers, so the same code reads
and writes local disk and object storage. `Location` wraps one kvstore rooted at the store and
offers the few verbs the engine needs: read, write, write-if-absent (the commit primitive), list
and delete. It does not cache and it holds no locks: consistency comes from immutable objects
plus one conditional write per commit (see `erstore.writer`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorstore as ts

from erstore.errors import (
    ErstoreError,
    StoreNotFoundError,
    StorePermissionError,
    StoreUnreachableError,
)
from erstore.integrity import confined, damaged

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
        spec["aws_region"] = (options.get("region") or os.environ.get("AWS_REGION")
                              or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        spec["aws_credentials"] = _credentials(options.get("credentials"))
        # Send `If-None-Match: *` on write-if-absent without a HEAD first: the PUT itself is the
        # conditional (AWS S3, MinIO, R2, moto honour it; `check_conditional_writes` verifies).
        spec["use_conditional_write"] = True
        # TensorStore's default retries wait minutes on an unreachable endpoint.
        spec["s3_request_retries"] = {"max_retries": int(options.get("retries", 8)),
                                      "initial_delay": "100ms", "max_delay": "8s"}
        return spec
    if text.startswith(("http://", "https://")):
        return {"driver": "http", "base_url": text.rstrip("/") + "/",
                "http_request_retries": {"max_retries": int(options.get("retries", 8)),
                                         "initial_delay": "100ms", "max_delay": "8s"}}
    if "://" in text:
        raise ErstoreError(f"unsupported store URL {text!r}: use a local path, s3:// or http(s)://")
    return {"driver": "file", "path": _dir(str(Path(text).expanduser().resolve()))}


def _dir(path: str) -> str:
    return path if not path or path.endswith("/") else path + "/"


def _credentials(choice: str | None) -> dict[str, Any]:
    """TensorStore `aws_credentials`: environment keys if set, else the default AWS chain.

    `choice` may be "environment", "default", "anonymous" or "profile:NAME".
    """
    if choice is None:
        choice = "environment" if os.environ.get("AWS_ACCESS_KEY_ID") else "default"
    if choice.startswith("profile:"):
        return {"type": "profile", "profile": choice.partition(":")[2]}
    if choice not in ("environment", "default", "anonymous"):
        raise ErstoreError(f"unknown credentials {choice!r}: use environment, default, anonymous or profile:NAME")
    return {"type": choice}


def explain(url: str, e: Exception) -> ErstoreError:
    """Turn a TensorStore I/O error into one that names the store and the likely fix."""
    text = str(e)
    if "NoSuchBucket" in text:
        bucket = url[len("s3://") :].partition("/")[0]
        return StoreNotFoundError(f"bucket {bucket!r} of {url} does not exist on this endpoint; "
                                  "create it first or check --endpoint / AWS_ENDPOINT_URL")
    if "credentials" in text.lower() and ("INTERNAL" in text or "environment" in text):
        return StorePermissionError(
            f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"(or AWS_PROFILE) ({_first_line(text)})")
    if "PERMISSION_DENIED" in text or "403" in text:
        found = "" if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE") else \
            " No credentials were found in AWS_ACCESS_KEY_ID / AWS_PROFILE."
        return StorePermissionError(f"access to {url} was denied (HTTP 403): check the credentials "
                                    f"and the bucket policy.{found}")
    if "CURL error" in text or "Could not connect" in text or "Couldn't resolve" in text:
        hint = "the URL" if url.startswith("http") else "--endpoint / AWS_ENDPOINT_URL"
        return StoreUnreachableError(f"cannot reach the endpoint of {url}: {_first_line(text)}; "
                                     f"check {hint} and the network")
    return ErstoreError(f"I/O error on {url}: {_first_line(text)}")


def _first_line(text: str) -> str:
    return text.split(" [", 1)[0].splitlines()[0] if text else text


@dataclass(frozen=True)
class Location:
    """A kvstore rooted at one store; keys are relative paths like ``versions/00000001.json``."""

    url: str
    spec: dict[str, Any]
    kv: ts.KvStore

    @classmethod
    def open(cls, url: str | os.PathLike[str], **options: Any) -> Location:
        """Open the kvstore; for object storage, one quick request first checks the endpoint,
        bucket and credentials so that a mistake fails in a second with a clear message."""
        spec = kvstore_spec(url, **options)
        text = os.fspath(url)
        try:
            kv = ts.KvStore.open(spec).result()
            if spec["driver"] == "s3":
                probe = ts.KvStore.open({**spec, "s3_request_retries": {"max_retries": 1}}).result()
                probe.list(ts.KvStore.KeyRange("erstore.json", "erstore.json\x00")).result()
            elif spec["driver"] == "http":
                probe = ts.KvStore.open({**spec, "http_request_retries": {"max_retries": 1}}).result()
                probe.read("erstore.json").result()
        except ValueError as e:
            raise explain(text, e) from e
        return cls(text, spec, kv)

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
        try:
            result = self.kv.read(key).result()
        except ValueError as e:
            raise explain(self.url, e) from e
        return result.value if result.state == "value" else None

    def read_capped(self, key: str, max_bytes: int) -> bytes | None:
        """Like `read`, but refuse (CorruptStoreError) a value over `max_bytes` before reading it,
        and on local disk a path whose real location is outside the store (a symlink out).

        A damaged or hostile store must not make a reader allocate gigabytes for a metadata file.
        """
        where = f"{self.url}/{key}"
        if self.is_local:
            path = confined(self.spec["path"], key, where)
            try:  # plain file I/O: no thread hop through TensorStore for a small file
                with open(path, "rb") as f:
                    raw = f.read(max_bytes + 1)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as e:
                raise damaged(where, f"cannot be read ({e.strerror})") from e
            if len(raw) > max_bytes:
                raise damaged(where, f"is more than the {max_bytes} bytes such a file can need")
            return raw
        try:  # one ranged request proves the value is no longer than the cap
            beyond = self.kv.read(key, byte_range=slice(max_bytes, max_bytes + 1)).result()
        except ValueError as e:
            if "OUT_OF_RANGE" not in str(e):
                raise explain(self.url, e) from e
        else:
            if beyond.state != "value":
                return None
            raise damaged(where, f"is more than the {max_bytes} bytes such a file can need")
        return self.read(key)

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """Read several keys concurrently."""
        futures = [self.kv.read(k) for k in keys]
        try:
            return [r.value if r.state == "value" else None for r in (f.result() for f in futures)]
        except ValueError as e:
            raise explain(self.url, e) from e

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
        if not stamp.generation and self.read(key) is None:
            # "Not written" although nobody has the key: the condition cannot be evaluated
            # (e.g. a bucket deleted meanwhile). Retrying would loop forever.
            raise StorePermissionError(f"cannot create {key!r} under {self.url}: the write was refused "
                                       "and the key does not exist; check that the bucket still exists")
        return bool(stamp.generation)

    def check_conditional_writes(self) -> None:
        """Fail unless write-if-absent is really conditional here (the commit relies on it).

        Object stores that ignore `If-None-Match: *` would let two racing builds both "win" the
        same version number; refuse to write to them rather than lose a version. The probe
        object is removed again; deleting is proven possible (a DELETE of the absent probe key)
        before anything is written, so missing permissions leave no object behind.
        """
        probe = f".erstore-probe/{os.getpid()}-{os.urandom(6).hex()}"
        try:
            self.kv.write(probe, None).result()  # S3 answers 204 for an absent key, 403 without permission
        except ValueError as e:
            raise self._permission_error("delete objects", e) from e
        try:
            first = self.kv.write(probe, b"1", if_equal=_NO_VALUE).result()
        except ValueError as e:
            raise self._permission_error("write objects", e) from e
        try:
            second = self.write_if_absent(probe, b"2") if first.generation else True
            kept = self.read(probe)
        finally:
            try:
                self.kv.write(probe, None).result()
            except ValueError as e:
                raise StorePermissionError(
                    f"could not delete the probe object {probe!r} under {self.url} ({_first_line(str(e))}); "
                    "delete it by hand and check the credentials' delete permission") from e
        if not first.generation or second or kept != b"1":
            raise StorePermissionError(
                f"{self.url} does not honour conditional writes (If-None-Match: *), which erstore "
                "needs to commit versions safely; use an object store that supports them (AWS S3, "
                "MinIO, Cloudflare R2) or a local path")

    def _permission_error(self, what: str, e: Exception) -> ErstoreError:
        error = explain(self.url, e)
        if not isinstance(error, StorePermissionError):
            return error
        found = "" if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE") else \
            " No credentials were found in AWS_ACCESS_KEY_ID / AWS_PROFILE: set them (or pass a profile)."
        return StorePermissionError(
            f"the credentials for {self.url} may not {what} there (HTTP 403); building a store needs "
            f"s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on the prefix.{found} "
            "Nothing was written")

    def preflight(self, *, write: bool) -> None:
        """Cheap checks before any corpus or model is loaded: the location is reachable and the
        credentials work (`Location.open` already made one request for that); when `write`, it is
        writable, deletes work and conditional writes are honoured. Leaves nothing behind.

        Raises StoreUnreachableError, StorePermissionError or StoreNotFoundError naming the fix.
        """
        if not self.is_local:
            if write:
                self.check_writable()
            return
        root = Path(self.spec["path"])
        if not write:
            if not root.is_dir():
                raise StoreNotFoundError(f"{self.url} does not exist; check the path")
            return
        if root.exists() and not root.is_dir():
            raise StorePermissionError(f"store path {root} is a file, not a folder; choose another --store")
        existing = next(p for p in (root, *root.parents) if p.exists())  # creates nothing
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorePermissionError(f"cannot write to store path {root} ({existing} is not writable); "
                                       "choose a writable --store")
        if existing == root and not (root / "erstore.json").exists() and holds_other_files(root):
            raise StoreNotFoundError(f"{root} exists, is not empty and is not an erstore store (no erstore.json); "
                                     "choose an empty or new --store path")

    def check_writable(self) -> None:
        """Fail early, before any compute, if the store location cannot be written."""
        if self.read_only:
            raise StorePermissionError(f"{self.url} is served over HTTP and is read-only")
        if self.spec["driver"] == "s3":
            self.check_conditional_writes()
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

    def _write_error(self, key: str, e: Exception) -> ErstoreError:
        if not self.is_local:
            return explain(self.url, e)
        return StorePermissionError(
            f"cannot write {key!r} under {self.url}: {e}; check that the store location exists, "
            "is writable and (for object storage) that the bucket and credentials are right"
        )

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted."""
        if self.read_only:
            raise ErstoreError(f"{self.url} is served over HTTP, which cannot list keys")
        try:
            if prefix:
                keys = self.kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()
            else:
                keys = self.kv.list().result()
        except ValueError as e:
            raise explain(self.url, e) from e
        return sorted(k.decode() for k in keys)

    def delete_prefix(self, prefix: str) -> None:
        self.kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()
        if self.is_local:  # the file driver leaves empty folders behind
            for folder, _, _ in os.walk(Path(self.spec["path"]) / prefix, topdown=False):
                # Not empty (a concurrent writer) or already gone (another rank or process
                # cleaning the same prefix): either way there is nothing left for us to do.
                with contextlib.suppress(OSError):
                    os.rmdir(folder)

    def size_of_prefix(self, prefix: str) -> int:
        """Bytes stored under `prefix` (local stat where possible, else by reading)."""
        if self.is_local:
            root = Path(self.spec["path"]) / prefix
            return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
        if self.spec["driver"] == "s3":
            sizes = _s3_sizes(self.spec, self.spec.get("path", "") + prefix)
            if sizes is not None:
                return sizes
        keys = self.list(prefix)
        return sum(len(v or b"") for v in self.read_many(keys))


def holds_other_files(folder: str | os.PathLike[str]) -> bool:
    """True if a local folder holds anything but what a writer creating a store there right now
    may have put: its probe file, or TensorStore's lock file of a half-written erstore.json."""
    return any(not (name.startswith(".probe-") or name.endswith(".__lock")) for name in os.listdir(folder))


def _s3_sizes(spec: dict[str, Any], prefix: str) -> int | None:
    """Bytes under an S3 prefix from ListObjectsV2 (1 request per 1000 objects) via boto3.

    TensorStore's Python list returns keys without sizes, so without boto3 the fallback reads
    every object. Returns None when boto3 is not installed or the listing fails.
    """
    try:
        import boto3
    except ImportError:
        return None
    creds = spec.get("aws_credentials", {})
    try:
        session = boto3.session.Session(profile_name=creds.get("profile") or None)
        client = session.client("s3", endpoint_url=spec.get("endpoint"), region_name=spec.get("aws_region"))
        total = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=spec["bucket"], Prefix=prefix):
            total += sum(obj["Size"] for obj in page.get("Contents", ()))
        return total
    except Exception:  # noqa: BLE001 - any boto3 problem: fall back to TensorStore reads
        return None
