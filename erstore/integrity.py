"""Checks that stand between a store's bytes and the objects built from them.

A store folder or bucket is untrusted input: it may come from another team, and disks and
networks flip bits. This module holds the few primitives every parser uses so that the checks
live in one place:

- `digest(raw)`: the xxh3-64 checksum (``"xxh3-64:<16 hex>"``) recorded in version manifests for
  the files a version reads (index files, document maps, codec parameters, zarr.json).
- `seal(data)` / `unseal(raw, where)`: JSON files that carry a checksum of themselves
  (erstore.json, version manifests). The checksum covers the canonical JSON of every other
  field, so any change that alters what the file says is caught, whatever the whitespace.
- size caps (`read_capped` in `erstore.location` applies them before a file is read),
- `check_name`: build and array ids that become paths must be plain names,
- `confined` / `symlinks_out`: local paths stay inside the store root.

Not here: chunk checksums (zstd's content checksum, checked by libzstd on every decode), or
what a damaged store should do next (`erstore verify` reports, `erstore copy` rewrites).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import xxhash

from erstore.errors import CorruptStoreError

CHECKSUM_FIELD = "checksum"
_PREFIX = "xxh3-64:"
# Build ids are `<UTC time>-<hex>`; anything that becomes a path must be at least a plain name.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")

# Generous caps on metadata files, checked before a file is read: a damaged or hostile store
# must not make a reader allocate gigabytes for a file that should hold kilobytes.
MAX_SMALL_JSON = 1 << 20  # erstore.json, tags, latest.json
MAX_ZARR_JSON = 1 << 20
MAX_MANIFEST = 256 << 20  # grows with the number of builds (~1 KiB per build)
MAX_INDEX_HEADER = 16 << 20


def digest(raw: bytes | memoryview) -> str:
    """Checksum of a file's bytes as recorded in a version manifest."""
    return _PREFIX + xxhash.xxh3_64_hexdigest(raw)


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def seal(data: dict[str, Any]) -> bytes:
    """JSON bytes of `data` plus a `checksum` field covering everything else."""
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    return _canonical({**body, CHECKSUM_FIELD: digest(_canonical(body))})


def unseal(data: dict[str, Any], where: str, *, required: bool) -> dict[str, Any]:
    """Check and drop the `checksum` field of parsed JSON `data` (from `where`).

    Raises CorruptStoreError if the checksum does not match, or if it is missing and `required`.
    """
    claimed = data.get(CHECKSUM_FIELD)
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    if claimed is None:
        if required:
            raise damaged(where, "has no checksum")
        return body
    if claimed != digest(_canonical(body)):
        raise damaged(where, "does not match its checksum")
    return body


def check_digest(raw: bytes, expected: str | None, where: str) -> None:
    """Raise CorruptStoreError unless `raw` has checksum `expected` (None: nothing recorded)."""
    if expected is not None and digest(raw) != expected:
        raise damaged(where, "does not match the checksum recorded in the version manifest")


def damaged(where: str, problem: str) -> CorruptStoreError:
    """The one wording of "this stored file is damaged", with what to do about it."""
    return CorruptStoreError(
        f"{where} {problem}: the store is damaged; run `erstore verify` on it, and restore the "
        "file from a copy of the store or rebuild"
    )


def check_name(name: Any, where: str, what: str = "build id") -> str:
    """A build or array id read from a store, which becomes a path: it must be a plain name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise damaged(where, f"names {what} {str(name)[:80]!r}, which is not a plain name "
                             "(a path outside its folder?)")
    return name


def confined(root: str | os.PathLike[str], relpath: str, where: str) -> Path:
    """`root/relpath` on local disk, refusing anything whose real path leaves `root`
    (`..` parts, absolute paths, or a symlink pointing elsewhere)."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, relpath))
    if os.path.commonpath([base, path]) != base:
        raise damaged(where, f"leads outside the store ({relpath} resolves to {path})")
    return Path(path)


def symlinks_out(root: str | os.PathLike[str], folder: str = "") -> list[str]:
    """Symlinks under `root/folder` whose target lies outside `root` (or dangles), relative to root.

    One directory scan (no stat per file): cheap enough to run once per build opened.
    """
    base = os.path.realpath(root)
    found: list[str] = []
    stack = [os.path.join(base, folder)] if folder else [base]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.commonpath([base, target]) != base or not os.path.exists(target):
                    found.append(os.path.relpath(entry.path, base))
                elif os.path.isdir(target):  # a link inside the root: its files are checked via the target
                    continue
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return sorted(found)


def refuse_symlinks_out(root: str | os.PathLike[str], folder: str, where: str) -> None:
    links = symlinks_out(root, folder)
    if links:
        raise damaged(where, f"contains symlinks leading outside the store ({', '.join(links[:3])})")
