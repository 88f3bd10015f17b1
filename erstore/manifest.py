"""On-disk metadata: the store's recipe, its version manifests and the binary key index.

Layout of a store (every path relative to the store root, any kvstore backend):

    erstore.json                  format tag + recipe, written once when the store is created
    versions/00000001.json        one manifest per committed version (written last, atomically)
    index/<build>.idx             keys -> rows added by one build (immutable)
    index/<build>.docs.json       document id -> keys of its windows, for that build's corpus
    arrays/<build>/states/        zarr3 array [rows, d] of hidden states (immutable once indexed)
    arrays/<build>/tokens/        zarr3 array [rows] of int32 token ids
    arrays/<build>/journal/N.idx  rows a running build has made durable (used to resume)

JSON only (never pickle); each JSON file carries `format_version` and load checks it. The `.idx`
files start with a magic tag and a version, then a JSON header, then packed little-endian records
(44 bytes per sequence).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from erstore.errors import CorruptStoreError, IncompatibleStoreError

FORMAT_VERSION = 1
STORE_FILE = "erstore.json"
INDEX_MAGIC = b"ERSTIDX\n"

RECORD_DTYPE = np.dtype(
    [
        ("hi", "<u8"),
        ("lo", "<u8"),
        ("row", "<u8"),
        ("checksum", "<u8"),
        ("array", "<u4"),
        ("length", "<u4"),
        ("boundary", "<u4"),
    ]
)


def check_format_version(data: dict[str, Any], where: str) -> None:
    found = data.get("format_version")
    if found != FORMAT_VERSION:
        newer = isinstance(found, int) and found > FORMAT_VERSION
        raise IncompatibleStoreError(
            f"{where} has format_version {found!r}, but this erstore reads format_version "
            f"{FORMAT_VERSION}; "
            + ("upgrade erstore (pip install -U erstore) to read it" if newer else
               "the file is not an erstore file or is damaged")
        )


@dataclass(frozen=True)
class Recipe:
    """What defines a store: two builds may share a store only if their recipes agree.

    `IDENTITY` lists the fields that must match; the rest (model name, config) is recorded for
    people and tools but does not change what the stored numbers mean.
    """

    model_fingerprint: str
    layer: int
    tokenizer_fingerprint: str
    max_length: int
    stride: int
    codec: dict[str, Any]
    hidden_size: int
    num_layers: int
    truncation: str = "overflowing-windows"
    model_name: str = ""
    model_type: str = ""
    tokenizer_name: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    IDENTITY = (
        "model_fingerprint",
        "layer",
        "tokenizer_fingerprint",
        "max_length",
        "stride",
        "truncation",
        "codec",
        "hidden_size",
    )

    def differences(self, other: Recipe) -> list[str]:
        """Human-readable list of identity fields that differ (empty when compatible)."""
        return [
            f"{name}: store has {getattr(self, name)!r}, this build has {getattr(other, name)!r}"
            for name in self.IDENTITY
            if getattr(self, name) != getattr(other, name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class StoreMeta:
    """Contents of `erstore.json`."""

    recipe: Recipe
    created: str
    libraries: dict[str, str]
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        data = {"format_version": self.format_version, "recipe": self.recipe.to_dict(),
                "created": self.created, "libraries": self.libraries}
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> StoreMeta:
        data = _load_json(raw, where)
        check_format_version(data, where)
        return cls(Recipe.from_dict(data["recipe"]), data["created"], data.get("libraries", {}))


@dataclass(frozen=True)
class Counts:
    sequences: int = 0
    tokens: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class VersionManifest:
    """Contents of `versions/NNNNNNNN.json`: one immutable, committed version."""

    version: int
    created: str
    indexes: tuple[str, ...]
    added: Counts
    totals: Counts
    build: dict[str, Any] = field(default_factory=dict)
    parent: int | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        data = asdict(self)
        data["indexes"] = list(self.indexes)
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> VersionManifest:
        data = _load_json(raw, where)
        check_format_version(data, where)
        return cls(
            version=data["version"],
            created=data["created"],
            indexes=tuple(data["indexes"]),
            added=Counts(**data["added"]),
            totals=Counts(**data["totals"]),
            build=data.get("build", {}),
            parent=data.get("parent"),
        )


def version_key(version: int) -> str:
    return f"versions/{version:08d}.json"


def parse_version_key(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if key.startswith("versions/") and stem.isdigit() and name != stem else None


def encode_index(records: np.ndarray, arrays: list[str]) -> bytes:
    """Serialise index records whose `array` field points into `arrays`."""
    header = json.dumps({"arrays": arrays, "count": int(len(records))}, sort_keys=True).encode()
    body = np.ascontiguousarray(records, dtype=RECORD_DTYPE).tobytes()
    return INDEX_MAGIC + struct.pack("<II", FORMAT_VERSION, len(header)) + header + body


def decode_index(raw: bytes, where: str) -> tuple[np.ndarray, list[str]]:
    """Parse an index file; return (records, array ids). Raises CorruptStoreError if damaged."""
    fixed = len(INDEX_MAGIC) + 8
    if len(raw) < fixed or raw[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise CorruptStoreError(f"{where} is not an erstore index file (bad magic tag)")
    version, header_len = struct.unpack_from("<II", raw, len(INDEX_MAGIC))
    check_format_version({"format_version": version}, where)
    try:
        header = json.loads(raw[fixed : fixed + header_len])
        arrays, count = list(header["arrays"]), int(header["count"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptStoreError(f"{where} has a damaged header: {e}") from e
    body = memoryview(raw)[fixed + header_len :]  # no copy of a possibly large body
    if len(body) != count * RECORD_DTYPE.itemsize:
        raise CorruptStoreError(
            f"{where} should hold {count} records ({count * RECORD_DTYPE.itemsize} bytes) "
            f"but has {len(body)} bytes; the file is truncated or damaged"
        )
    records = np.frombuffer(body, dtype=RECORD_DTYPE)
    if count and int(np.ascontiguousarray(records["array"]).max()) >= len(arrays):
        raise CorruptStoreError(f"{where} points at an array outside its header")
    return records, arrays


def _load_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise CorruptStoreError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CorruptStoreError(f"{where} should hold a JSON object")
    return data
