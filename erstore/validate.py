"""Validation of what a store's files say, where their bytes become objects.

Every reader (TensorStore reads in `erstore.store`, the fork-safe `erstore.localread`, `verify`,
`gc`, `copy`) goes through these checks once, so the rest of the code can trust its inputs:

- `read_checked`: a file's bytes, with its size and xxh3-64 checked against the version
  manifest (format 2; required there) and a generous size cap before reading (format 1),
- `check_index`: every index record against the recipe and the manifest's counts (a length of
  2**32-1 must not become an allocation); `check_build_records`: a build's index parts
  (format 3; their number is capped when the manifest is parsed) add up to no more records
  than the version holds,
- `array_metadata`: a zarr.json must describe exactly the array the codec writes (chunk shape,
  dtype, codecs), so a damaged chunk shape cannot make a reader allocate gigabytes,
- `check_documents`: a document map is an object of id -> list of keys,
- `read_error`: a failed chunk read (zstd checksum mismatch, missing or undecodable chunk) as a
  CorruptStoreError naming the array, rows and key, and suggesting `erstore verify`.

Not here: the checksum primitives (`erstore.integrity`) and the parsing of manifests and index
files (`erstore.manifest`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from erstore.codecs import MAX_ROWS, Codec
from erstore.errors import CorruptStoreError, ErstoreError
from erstore.integrity import MAX_INDEX_HEADER, check_digest, damaged, digest
from erstore.keys import KEY_HEX_CHARS

if TYPE_CHECKING:
    from erstore.index import KeyIndex
    from erstore.location import Location
    from erstore.manifest import Recipe, VersionManifest

INDEX_FIXED_BYTES = 16
# Longest sequence one index record may claim. Builds store windows of at most max_length tokens;
# direct `StoreWriter.append` users may store longer ones, but not beyond this: a damaged length
# (2**32-1) must not become a multi-gigabyte allocation before the read can fail.
MAX_SEQUENCE_ROWS = 1 << 20
MAX_FORMAT1_DOCS = 1 << 30  # format-1 stores record no sizes: only a generous fixed cap


def codec_json_cap(hidden_size: int) -> int:
    """Most bytes a build's codec.json can need: a d x d int16 rotation in base64 plus d floats."""
    return 1 << 20 if hidden_size <= 0 else (hidden_size * hidden_size * 2 * 4) // 3 + 64 * hidden_size + (1 << 20)


def index_cap(manifest: VersionManifest) -> int:
    """Most bytes one index file of `manifest`'s version can hold: each file's keys are unique
    and all are in the version, so no file has more records than the version's total."""
    return INDEX_FIXED_BYTES + MAX_INDEX_HEADER + 44 * manifest.totals.sequences


def check_build_records(records: int, manifest: VersionManifest, where: str) -> None:
    """One build's index parts hold unique keys, all in the version: together no more records
    than the version's total (so many hostile parts cannot add up to more than one file could)."""
    if records > manifest.totals.sequences:
        raise damaged(where, f"brings its build's index to {records} records, more than the "
                             f"{manifest.totals.sequences} sequences of the version")


def read_checked(location: Location, manifest: VersionManifest | None, relpath: str, *, cap: int,
                 required: bool, optional: bool = False) -> bytes | None:
    """Bytes of `relpath` (None if absent and allowed), checked against `manifest`'s record.

    `required`: the store is verified (format 2), so every file read must be recorded.
    `optional`: the file may legitimately not exist (a lossless build has no codec.json).
    """
    where = f"{location.url}/{relpath}"
    record = manifest.file(relpath) if manifest is not None else None
    if record is None:
        raw = location.read_capped(relpath, cap)
        if required and not (optional and raw is None):
            raise damaged(where, "is not recorded in the version manifest" if raw is not None else "is missing")
        return raw
    if record["bytes"] > cap:  # a hostile manifest must not lift the cap either
        raise damaged(where, f"is recorded as {record['bytes']} bytes, more than the {cap} such a file can need")
    raw = location.read_capped(relpath, record["bytes"])
    if raw is None:
        raise damaged(where, "is missing")
    if len(raw) != record["bytes"]:
        raise damaged(where, f"is {len(raw)} bytes, but the version manifest recorded {record['bytes']}")
    check_digest(raw, record["xxh3_64"], where)
    return raw


def check_index(index: KeyIndex, manifest: VersionManifest, recipe: Recipe, where: str) -> None:
    """Every record must point at rows the codec can have written, and the counts must agree."""
    check_records(index.records, where)
    check_counts(len(index), int(index.records["length"].sum(dtype=np.uint64)), manifest, where)


def check_records(records: np.ndarray, where: str) -> None:
    """Records of one index file (or all): lengths, pair boundaries and rows within bounds."""
    if not len(records):
        return
    lengths = records["length"].astype(np.int64)
    worst = int(lengths.max())
    if worst > MAX_SEQUENCE_ROWS:
        raise damaged(where, f"indexes a sequence of {worst} tokens (a record holds at most {MAX_SEQUENCE_ROWS})")
    if (records["boundary"].astype(np.int64) > lengths).any():
        raise damaged(where, "indexes a text pair whose boundary lies beyond its sequence")
    if int(records["row"].max()) > MAX_ROWS - MAX_SEQUENCE_ROWS:
        raise damaged(where, "indexes rows beyond the end of its arrays")


def check_counts(sequences: int, tokens: int, manifest: VersionManifest, where: str) -> None:
    """The unique sequences and their tokens must be what the version manifest counts."""
    if sequences != manifest.totals.sequences or tokens != manifest.totals.tokens:
        raise damaged(where, f"counts {manifest.totals.sequences} sequences / {manifest.totals.tokens} tokens, "
                             f"but its index files hold {sequences} / {tokens}")


def check_documents(raw: bytes | None, where: str) -> dict[str, list[str]]:
    """A build's document map (id -> window keys), validated; {} if the build has none."""
    if raw is None:
        return {}
    try:
        docs = json.loads(raw)
    except ValueError as e:
        raise damaged(where, f"is not valid JSON ({e})") from e
    if not isinstance(docs, dict) or not all(
            isinstance(keys, list) and all(isinstance(k, str) and len(k) == KEY_HEX_CHARS for k in keys)
            for keys in docs.values()):
        raise damaged(where, "is not a map of document ids to lists of keys")
    return docs


def expected_arrays(codec: Codec, hidden_size: int) -> dict[str, dict[str, Any]]:
    """zarr3 metadata of every array a build writes, as the writer creates them (tokens included:
    int32, the states' codecs without transpose, chunks four times as tall)."""
    arrays = codec.arrays(hidden_size)
    states = arrays["states"]
    rows = states["chunk_grid"]["configuration"]["chunk_shape"][0] * 4
    return {**arrays, "tokens": {
        **states, "shape": [states["shape"][0]], "data_type": "int32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows]}},
        "codecs": [c for c in states["codecs"] if c["name"] != "transpose"]}}


_DEFAULTS = {"bytes": {"endian": "little"}, "zstd": {"checksum": False}}


def _codecs(codecs: Any) -> list[tuple[str, str]]:
    out = []
    for c in codecs:
        name = c["name"]
        config = {**_DEFAULTS.get(name, {}), **(c.get("configuration") or {})}
        out.append((name, json.dumps(config, sort_keys=True)))
    return out


def array_metadata(raw: bytes | None, codec: Codec, hidden_size: int, name: str,
                   where: str, *, verified: bool = False) -> tuple[dict[str, Any], bool]:
    """Check a stored zarr.json against what `codec` writes for array `name`.

    Returns (the expected metadata, for TensorStore to check again as it opens; whether chunks
    carry zstd content checksums). Raises CorruptStoreError if the file says anything else.
    """
    if raw is None:
        raise damaged(where, "is missing")
    expected = expected_arrays(codec, hidden_size)[name]
    try:
        meta = json.loads(raw)
        found = (meta["shape"], meta["data_type"], meta["chunk_grid"], meta.get("fill_value", 0),
                 meta.get("chunk_key_encoding", {"name": "default"}), _codecs(meta["codecs"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise damaged(where, f"is not zarr3 array metadata ({type(e).__name__}: {e})") from e
    encoding = {"name": "default", "configuration": {"separator": "/"}}
    if found[4] not in ({"name": "default"}, encoding):
        raise damaged(where, f"uses chunk keys {found[4]}, which erstore never writes")
    for checked in (True, False) if not verified else (True,):  # verified stores always have checksums
        want_codecs = [_zstd_checksum(c, checked) for c in expected["codecs"]]  # format-1 builds: none
        want = (expected["shape"], expected["data_type"], expected["chunk_grid"], 0, None, _codecs(want_codecs))
        if _rows_ok(found[0], want[0]) and found[1:3] == want[1:3] and found[3] == 0 and found[5] == want[5]:
            return {**expected, "shape": list(found[0]), "codecs": want_codecs}, checked
    raise damaged(where, f"does not describe the array erstore writes for this codec (expected chunk shape "
                         f"{expected['chunk_grid']['configuration']['chunk_shape']}, dtype {expected['data_type']})")


def _rows_ok(found: Any, want: list[int]) -> bool:
    """A committed build's arrays are shrunk to the rows written (plain zarr readers then see the
    real shape); arrays of a build still being written, or of format-1 stores, are MAX_ROWS long."""
    return (isinstance(found, list) and len(found) == len(want) and found[1:] == want[1:]
            and isinstance(found[0], int) and not isinstance(found[0], bool) and 0 <= found[0] <= want[0])


def file_record(raw: bytes) -> dict[str, Any]:
    """What a version manifest records of a file it reads."""
    return {"bytes": len(raw), "xxh3_64": digest(raw)}


def array_file_records(location: Location, array_id: str, codec: Codec, hidden_size: int) -> dict[str, dict[str, Any]]:
    """Records of one build's array metadata files (zarr.json of each array, codec.json if any)."""
    out = {}
    names = [f"arrays/{array_id}/{n}/zarr.json" for n in expected_arrays(codec, hidden_size)]
    names.append(f"arrays/{array_id}/codec.json")
    for relpath, raw in zip(names, location.read_many(names)):
        if raw is not None:
            out[relpath] = file_record(raw)
    return out


def _zstd_checksum(codec: dict[str, Any], on: bool) -> dict[str, Any]:
    if codec["name"] != "zstd":
        return codec
    return {"name": "zstd", "configuration": {**codec.get("configuration", {}), "checksum": on}}


_UNREACHABLE = ("CURL error", "Could not connect", "Couldn't resolve", "PERMISSION_DENIED", "UNAVAILABLE",
                "DEADLINE_EXCEEDED", "UNAUTHENTICATED")


def read_error(where: str, key: str, url: str, e: Exception) -> ErstoreError:
    """A failed chunk read: damage (CorruptStoreError) unless it is plainly a network problem."""
    text = str(e)
    if any(s in text for s in _UNREACHABLE):
        from erstore.location import explain

        return explain(url, e)
    first = text.split(" [", 1)[0].splitlines()[0] if text else type(e).__name__
    return CorruptStoreError(
        f"{where} (key {key}) cannot be read as stored: {first}. The store is damaged; run "
        f"`erstore verify {url}` to list the damaged sequences, and restore them from a copy or rebuild"
    )
