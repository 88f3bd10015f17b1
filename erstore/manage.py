"""Version management and catalog: `tag`, `diff`, `copy`, `gc` and `ls`.

Versions are immutable: nothing here rewrites a version manifest, an index file or an array.
`tag` names a version (`tags/NAME.json`, written once; `force=True` moves it), `diff` compares
the key sets of two versions, `copy` re-appends a version or a key subset into another store
(any backend to any backend, same recipe, bit-exact bytes, fresh checksums), `ls` lists the
stores under a folder or bucket prefix.

`gc` reclaims space. Kept versions stay readable bit for bit; a dropped version's manifest is
deleted and opening it fails. Without keep options every version is kept and gc removes only
what no version references: arrays, index files and journals of builds that died (killed, or
lost their commit) and are older than the grace period. With `keep_last` / `keep`, versions
outside the kept set are dropped; the newest version and every tagged version are always kept,
so version numbers are never reused. Because version N+1 contains everything of version N,
dropping old versions frees only their manifests; data leaves a store only through dead builds
(or by copying the wanted keys into a new store). Not here: compaction (rewriting arrays).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from erstore import progress as _progress
from erstore.errors import ErstoreError, InvalidInputError, StoreNotFoundError
from erstore.integrity import refuse_symlinks_out, seal
from erstore.keys import join_key
from erstore.location import Location
from erstore.manifest import STORE_FILE, version_key
from erstore.store import (
    Store,
    index_files,
    list_versions,
    read_manifest,
    read_meta,
    resolve_tag,
    tag_key,
)

TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,127}")
DEFAULT_GRACE_HOURS = 24.0 * 7
COPY_BATCH = 256


# -- tags -------------------------------------------------------------------------------------
def tag(url: str, version: int | str, name: str, *, force: bool = False, **options: Any) -> int:
    """Name `version` of the store at `url` as `name`; return the version number.

    Raises InvalidInputError for a bad name or an existing tag (unless `force`), and
    StoreNotFoundError if the version does not exist.
    """
    if not TAG_NAME.fullmatch(name):
        raise InvalidInputError(f"bad tag name {name!r}: use letters, digits, '.', '_' or '-', "
                                "starting with a letter or '_'")
    location = Location.open(url, **options)
    number = resolve_tag(location, version) if isinstance(version, str) else int(version)
    if number not in list_versions(location):
        raise StoreNotFoundError(f"{url} has no version {number}; see `erstore versions {url}`")
    # Sealed (a checksum of itself): a flipped digit must not silently point the tag elsewhere.
    data = seal({"format_version": 2, "name": name, "version": number,
                 "created": dt.datetime.now(dt.timezone.utc).isoformat()})
    if force:
        location.write(tag_key(name), data)
    elif not location.write_if_absent(tag_key(name), data):
        raise InvalidInputError(f"tag {name!r} already exists in {url} (version {resolve_tag(location, name)}); "
                                "pass --force to move it")
    return number


def tags(url: str | Location, **options: Any) -> dict[str, int]:
    """All tags of a store: name -> version."""
    location = url if isinstance(url, Location) else Location.open(url, **options)
    if location.read_only:
        return {}
    names = [k[len("tags/") : -len(".json")] for k in location.list("tags/") if k.endswith(".json")]
    return {n: resolve_tag(location, n) for n in names if TAG_NAME.fullmatch(n)}  # each file checked


# -- diff -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Diff:
    a: int | None
    b: int | None
    added: list[str]
    removed: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diff(url: str, a: int | str, b: int | str, **options: Any) -> Diff:
    """Keys in version `b` but not `a` (added) and in `a` but not `b` (removed)."""
    with Store(url, version=a, **options) as old, Store(url, version=b, **options) as new:
        o, n = old.index.records, new.index.records
        added = n[old.index.find_halves(n["hi"], n["lo"]) < 0]
        removed = o[new.index.find_halves(o["hi"], o["lo"]) < 0]
        keys = lambda r: [join_key(hi, lo) for hi, lo in zip(r["hi"].tolist(), r["lo"].tolist())]  # noqa: E731
        return Diff(old.version, new.version, keys(added), keys(removed))


# -- copy -------------------------------------------------------------------------------------
def copy(src: str, dst: str, *, version: int | str | None = None, keys: list[str] | None = None,
         src_options: dict[str, Any] | None = None, dst_options: dict[str, Any] | None = None,
         progress: bool | str = True) -> Any:
    """Copy a version (or the sequences `keys` of it) of `src` into `dst` as one new version.

    `dst` is created with `src`'s recipe, or must already have the same recipe. Stored bytes,
    keys, pair boundaries and document windows are kept exactly; sequences `dst` already has
    are skipped. Returns the new `VersionManifest`, or None if `dst` had everything.
    `progress` (True or a mode of `erstore.progress`) reports sequences copied on stderr.
    """
    from erstore.writer import StoreWriter

    reporter = _progress.reporter("copy", progress)

    with Store(src, version=version, **(src_options or {})) as source:
        if keys is None:
            positions = np.arange(len(source), dtype=np.int64)
            wanted = list(source)
        else:
            wanted = list(dict.fromkeys(keys))
            positions = source.index.find(wanted)
            missing = [k for k, p in zip(wanted, positions) if p < 0]
            if missing:
                raise InvalidInputError(f"{len(missing)} key(s) are not in {src} version {source.version}, "
                                        f"e.g. {missing[0]}")
        with StoreWriter(dst, source.recipe, **(dst_options or {})) as writer:
            todo = positions[np.asarray(writer.missing(wanted), dtype=bool)] if len(wanted) else positions
            with reporter.phase("sequences", total=len(todo), unit="sequences") as phase:
                for start in range(0, len(todo), COPY_BATCH):
                    batch = source.read_positions(todo[start : start + COPY_BATCH])
                    for e in batch:
                        writer.append(e.key, e.states, e.token_ids, boundary=e.boundary)
                    phase.update(len(batch))
            chosen = set(wanted)
            with reporter.phase("commit", unit=None):
                for doc, doc_keys in _documents(source).items():
                    if all(k in chosen for k in doc_keys):
                        writer.add_document(doc, doc_keys)
                return writer.commit(build={"copied_from": source.location.url, "source_version": source.version,
                                            "copied": int(len(todo)), "requested": len(wanted)})


def _documents(store: Store) -> dict[str, list[str]]:
    return store.documents()  # checked against the manifest like every other read


# -- gc ---------------------------------------------------------------------------------------
@dataclass
class GcReport:
    store: str
    dry_run: bool
    kept_versions: list[int]
    dropped_versions: list[int]
    deleted_builds: list[str] = field(default_factory=list)
    recent_builds: list[str] = field(default_factory=list)  # unreferenced but within the grace period
    freed_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gc(url: str, *, keep: list[int | str] = (), keep_last: int | None = None, dry_run: bool = False,
       grace_hours: float = DEFAULT_GRACE_HOURS, now: dt.datetime | None = None, progress: bool | str = True,
       **options: Any) -> GcReport:
    """Delete what no kept version needs; see the module docstring for what "kept" means.

    Run it while no build writes to the store, or with a grace period longer than any build:
    a running build's arrays are referenced by no version until it commits. `progress` (True or
    a mode of `erstore.progress`) reports the versions scanned and builds deleted on stderr.
    """
    reporter = _progress.reporter("gc", progress)
    location = Location.open(url, **options)
    if location.read_only:
        raise ErstoreError(f"{url} is served over HTTP and is read-only; run gc where the store lives")
    if location.is_local:  # deleting through a symlink could remove files outside the store
        refuse_symlinks_out(location.spec["path"], "", location.url)
    versions = list_versions(location)
    if not versions:
        raise StoreNotFoundError(f"{url} has no committed version")
    kept = set(versions)
    if keep or keep_last is not None:
        named = {resolve_tag(location, v) if isinstance(v, str) and not v.isdigit() else int(v) for v in keep}
        unknown = named - set(versions)
        if unknown:
            raise InvalidInputError(f"cannot keep version(s) {sorted(unknown)}: {url} has {versions}")
        kept = named | set(versions[-keep_last:] if keep_last else ()) | set(tags(location).values())
        kept.add(versions[-1])  # the newest: later builds number from it
    dropped = [v for v in versions if v not in kept]

    needed_builds: set[str] = set()
    meta = read_meta(location)
    with reporter.phase("scan", total=len(kept), unit="versions") as phase:
        for v in sorted(kept):  # every kept version's files checked, as a reader would
            manifest = read_manifest(location, v)
            needed_builds.update(manifest.indexes)
            for _, _, _, arrays in index_files(location, manifest, required=meta.verified):
                needed_builds.update(arrays)
            phase.update()

    report = GcReport(location.url, dry_run, sorted(kept), dropped)
    now = now or dt.datetime.now(dt.timezone.utc)
    unreferenced = sorted(_builds(location) - needed_builds)
    with reporter.phase("unreferenced", total=len(unreferenced), unit="builds",
                        detail=lambda: f"{report.freed_bytes / 1e6:,.1f} MB {'to free' if dry_run else 'freed'}") as phase:
        for build in unreferenced:
            phase.update()
            if (now - _last_activity(location, build)).total_seconds() < grace_hours * 3600:
                report.recent_builds.append(build)
                continue
            report.deleted_builds.append(build)
            prefixes = [f"arrays/{build}/", f"journal/{build}/"]
            report.freed_bytes += sum(location.size_of_prefix(p) for p in prefixes)
            build_files = [k for k in location.list(f"index/{build}.")]
            report.freed_bytes += sum(len(v or b"") for v in location.read_many(build_files))
            if not dry_run:
                for p in prefixes:
                    location.delete_prefix(p)
                for k in build_files:
                    location.delete_prefix(k)
    if not dry_run:
        for v in dropped:
            location.delete_prefix(version_key(v))
    return report


def _builds(location: Location) -> set[str]:
    """Build ids that own anything under arrays/, journal/ or index/."""
    out: set[str] = set()
    for folder in ("arrays/", "journal/"):
        out.update(k[len(folder) :].split("/", 1)[0] for k in location.list(folder))
    out.update(k[len("index/") :].split(".", 1)[0] for k in location.list("index/"))
    # Only plain names: a hostile key such as `arrays/../x` must not become a path to delete.
    return {b for b in out if b and b != ".." and "/" not in b and "\\" not in b}


def _last_activity(location: Location, build: str) -> dt.datetime:
    """When a build last wrote: its id's start time, or a newer file time on local disk."""
    try:
        start = dt.datetime.strptime(build[:15], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        start = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    if location.is_local:
        root = Path(location.spec["path"])
        paths = [p for d in (root / "arrays" / build, root / "journal" / build) if d.exists() for p in d.rglob("*")]
        paths += list((root / "index").glob(f"{build}.*"))
        if paths:
            newest = max(p.stat().st_mtime for p in paths)
            start = max(start, dt.datetime.fromtimestamp(newest, dt.timezone.utc))
    return start


# -- ls ---------------------------------------------------------------------------------------
_STORE_PARTS = {"arrays", "index", "journal", "versions", "tags"}


def ls(root: str, **options: Any) -> list[dict[str, Any]]:
    """The stores under a folder or an `s3://bucket/prefix`: recipe, versions, tags and size."""
    text = os.fspath(root)
    if text.startswith("s3://"):
        location = Location.open(text, **options)
        base = text.rstrip("/")
        urls = [f"{base}/{k[: -len(STORE_FILE)].rstrip('/')}".rstrip("/") for k in location.list()
                if k == STORE_FILE or k.endswith("/" + STORE_FILE)]
    elif "://" in text:
        raise InvalidInputError(f"cannot list stores under {text}: give a folder or s3:// prefix")
    else:
        if not Path(text).is_dir():
            raise StoreNotFoundError(f"{text} is not a folder")
        urls = []
        for folder, subdirs, files in os.walk(text):
            if STORE_FILE in files:
                urls.append(folder)
                subdirs[:] = [d for d in subdirs if d not in _STORE_PARTS]
            subdirs.sort()
    return [_summary(u, options) for u in sorted(urls)]


def _summary(url: str, options: dict[str, Any]) -> dict[str, Any]:
    with Store(url, **options) as store:
        r, m = store.recipe, store.manifest
        return {
            "store": url, "model": r.model_name, "model_type": r.model_type, "layer": r.layer,
            "tokenizer": r.tokenizer_name, "tokenizer_fingerprint": r.tokenizer_fingerprint,
            "max_length": r.max_length, "codec": r.codec, "hidden_size": r.hidden_size,
            "versions": list_versions(store.location), "tags": tags(store.location),
            "sequences": len(store), "tokens": store.index.total_tokens, "bytes": m.totals.bytes if m else 0,
        }


__all__ = ["Diff", "GcReport", "copy", "diff", "gc", "ls", "tag", "tags"]
