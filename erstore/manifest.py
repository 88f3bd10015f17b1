"""On-disk metadata: the store's recipe, its version manifests and the binary key index.

Layout of a store (every path relative to the store root, any kvstore backend):

    erstore.json                  format tag + recipe, written once when the store is created
    versions/00000001.json        one manifest per committed version (written last, atomically)
    index/<build>.idx             keys -> rows added by one build (immutable); part 0 of its index
    index/<build>.pNNNNNN.idx     parts 1.. of a large build's index (format 3; see `parts`)
    index/<build>.docs.json       document id -> keys of its windows, for that build's corpus
    index/<build>.pNNNNNN.docs.json  parts 1.. of a large build's document map
    arrays/<build>/states/        zarr3 array [rows, d] of hidden states (immutable once indexed)
    arrays/<build>/tokens/        zarr3 array [rows] of int32 token ids
    journal/<build>/N.idx         rows a running build has made durable (used to resume)
    journal/<build>/N.docs        document-map lines of the input documents made durable by then

JSON only (never pickle); each JSON file carries `format_version` and load checks it. The `.idx`
files start with a magic tag and a version, then a JSON header, then packed little-endian records
(44 bytes per sequence).

Format 2 (this version) makes every read verifiable: erstore.json and each version manifest carry
a checksum of themselves (`erstore.integrity.seal`; the scheme is fixed for every later format
too), and a manifest lists the size and xxh3-64 of every file its version reads (`files`: index
files, document maps, codec parameters, zarr.json); the arrays' zstd chunks carry zstd's content
checksum.
Format 1 stores still open and read, unverified (`erstore copy` rewrites one as format 2).
Format 3 differs only in that a build's index and document map may be split into parts, so a
build never holds its whole index in memory: a version manifest whose `parts` names a build
with more than one part is written as format 3 (older erstores then ask to be upgraded); every
other manifest, and erstore.json, stay format 2, byte for byte as before.
Everything parsed here is validated (types, names that become paths, counts) before use.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import xxhash

from erstore.errors import CorruptStoreError, IncompatibleStoreError
from erstore.integrity import CHECKSUM_FIELD, MAX_INDEX_HEADER, check_name, damaged, seal, unseal

FORMAT_VERSION = 2
PARTS_FORMAT = 3  # a version manifest that lists multi-part builds (`VersionManifest.parts`)
READABLE_VERSIONS = (1, 2, 3)
NEWEST_FORMAT = max(READABLE_VERSIONS)
# A build's index and document map have at most this many part files each: at the writer's
# 2**18 records per part that is 2**38 sequences, and a hostile manifest cannot make a reader
# loop over more names than this.
MAX_PARTS = 1 << 20
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
    if found not in READABLE_VERSIONS or isinstance(found, bool):
        newer = isinstance(found, int) and found > NEWEST_FORMAT
        raise IncompatibleStoreError(
            f"{where} has format_version {found!r}, but this erstore reads format_version "
            f"{NEWEST_FORMAT} and older; "
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

    def problem(self) -> str | None:
        """What makes this recipe unusable for reading (sizes that would drive allocations), or None."""
        for name in ("layer", "max_length", "stride", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 20:
                return f"has recipe.{name} {value!r}, not an integer in [0, 2**20]"
        if self.hidden_size < 1 or self.max_length < 1:
            return "has a recipe with hidden_size or max_length below 1"
        if not isinstance(self.codec, dict):
            return "has a recipe.codec that is not a JSON object"
        return None


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
        if self.format_version < 2:
            return json.dumps(data, indent=2, sort_keys=True).encode()
        return seal(data)

    @property
    def verified(self) -> bool:
        """True if reads of this store are checked (format 2 and later)."""
        return self.format_version >= 2

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> StoreMeta:
        data = _load_sealed(raw, where)
        try:
            recipe = Recipe.from_dict(data["recipe"])
            meta = cls(recipe, str(data["created"]), dict(data.get("libraries", {})), data["format_version"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise damaged(where, f"does not hold a valid store description ({type(e).__name__}: {e})") from e
        if problem := recipe.problem():
            raise damaged(where, problem)
        return meta


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
    # relative path -> {"bytes": size, "xxh3_64": digest} of every file this version reads
    # (format 2); files of format-1 builds inherited by a later version are absent (unverified).
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # build id -> [index parts, document map parts] of builds written in more than one part
    # (format 3); a build absent here has one index file and one document map.
    parts: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.parts and self.format_version < PARTS_FORMAT:  # older readers must not half-read it
            object.__setattr__(self, "format_version", PARTS_FORMAT)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["indexes"] = list(self.indexes)
        if not self.parts:
            del data["parts"]  # format 2 manifests stay byte-identical
        if self.format_version < 2:
            del data["files"]
            return json.dumps(data, indent=2, sort_keys=True).encode()
        return seal(data)

    def file(self, relpath: str) -> dict[str, Any] | None:
        """The recorded size and checksum of `relpath`, or None if this version records none."""
        return self.files.get(relpath)

    def index_paths(self, build: str) -> list[str]:
        """Relative paths of the index files of `build`, in order."""
        return part_paths(build, ".idx", self.parts.get(build, [1, 1])[0])

    def docs_paths(self, build: str) -> list[str]:
        """Relative paths of the document map files of `build`, in order."""
        return part_paths(build, ".docs.json", self.parts.get(build, [1, 1])[1])

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> VersionManifest:
        data = _load_sealed(raw, where)
        try:
            manifest = cls(
                version=_count(data["version"]),
                created=str(data["created"]),
                indexes=tuple(check_name(n, where) for n in _list(data["indexes"])),
                added=_counts(data["added"]),
                totals=_counts(data["totals"]),
                build=dict(data.get("build", {})),
                parent=None if data.get("parent") is None else _count(data["parent"]),
                format_version=data["format_version"],
                files={str(k): _file_record(v) for k, v in dict(data.get("files", {})).items()},
                parts={str(k): _parts(v) for k, v in dict(data.get("parts", {})).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CorruptStoreError):
                raise
            raise damaged(where, f"is not a valid version manifest ({type(e).__name__}: {e})") from e
        if len(set(manifest.indexes)) != len(manifest.indexes):
            raise damaged(where, "lists a build twice")
        if not set(manifest.parts) <= set(manifest.indexes):
            raise damaged(where, "lists index parts of a build it does not contain")
        if manifest.parts and data["format_version"] < PARTS_FORMAT:
            raise damaged(where, f"lists index parts but says format_version {data['format_version']}")
        return manifest


def part_paths(build: str, suffix: str, count: int) -> list[str]:
    """`index/<build><suffix>` and, for parts 1.., `index/<build>.pNNNNNN<suffix>`."""
    return [f"index/{build}{suffix}" if i == 0 else f"index/{build}.p{i:06d}{suffix}" for i in range(count)]


def _parts(value: Any) -> list[int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_PARTS for n in value)):
        raise ValueError(f"part counts {value!r} are not two integers in [1, {MAX_PARTS}]")
    return list(value)


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise ValueError(f"{value!r} is not a count")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, found {type(value).__name__}")
    return value


def _counts(value: Any) -> Counts:
    return Counts(_count(value["sequences"]), _count(value["tokens"]), _count(value["bytes"]))


def _file_record(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("xxh3_64"), str):
        raise TypeError(f"file record {value!r} lacks its checksum")
    return {"bytes": _count(value["bytes"]), "xxh3_64": value["xxh3_64"]}


def version_key(version: int) -> str:
    return f"versions/{version:08d}.json"


def parse_version_key(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if key.startswith("versions/") and stem.isdigit() and name != stem else None


def encode_index(records: np.ndarray, arrays: list[str], *, extra: dict[str, Any] | None = None,
                 sealed: bool = False) -> bytes:
    """Serialise index records whose `array` field points into `arrays`.

    `extra`: more header fields (a journal's resume point). `sealed`: the header carries a
    checksum of itself and the body (journals, which no manifest records); index files of a
    version need none, the manifest records their checksums.
    """
    body = np.ascontiguousarray(records, dtype=RECORD_DTYPE).data
    fields = {**(extra or {}), "arrays": arrays, "count": int(len(records))}
    if sealed:
        fields[CHECKSUM_FIELD] = _index_digest(fields, body)
    header = json.dumps(fields, sort_keys=True).encode()
    return b"".join([INDEX_MAGIC, struct.pack("<II", FORMAT_VERSION, len(header)), header, body])


def _index_digest(fields: dict[str, Any], body: memoryview | bytes) -> str:
    h = xxhash.xxh3_64(json.dumps({k: v for k, v in fields.items() if k != CHECKSUM_FIELD},
                                  sort_keys=True).encode())
    h.update(body)
    return "xxh3-64:" + h.hexdigest()


def decode_index(raw: bytes, where: str) -> tuple[np.ndarray, list[str]]:
    """Parse an index file; return (records, array ids). Raises CorruptStoreError if damaged."""
    records, arrays, _ = decode_index_file(raw, where)
    return records, arrays


def decode_index_file(raw: bytes, where: str, *, sealed: bool = False) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Parse an index or journal file: (records, array ids, header). `sealed`: the header must
    carry a matching checksum of itself and the body (journal files)."""
    fixed = len(INDEX_MAGIC) + 8
    if len(raw) < fixed or raw[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise damaged(where, "is not an erstore index file (bad magic tag)")
    version, header_len = struct.unpack_from("<II", raw, len(INDEX_MAGIC))
    check_format_version({"format_version": version}, where)
    if header_len > min(MAX_INDEX_HEADER, len(raw) - fixed):
        raise damaged(where, f"claims a {header_len}-byte header in a {len(raw)}-byte file")
    try:
        header = json.loads(bytes(raw[fixed : fixed + header_len]))
        arrays, count = [check_name(a, where, "array") for a in _list(header["arrays"])], _count(header["count"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, CorruptStoreError):
            raise
        raise damaged(where, f"has a damaged header ({e})") from e
    body = memoryview(raw)[fixed + header_len :]  # no copy of a possibly large body
    if sealed and header.get(CHECKSUM_FIELD) != _index_digest(header, body):
        raise damaged(where, "has no checksum" if CHECKSUM_FIELD not in header else "does not match its checksum")
    if len(body) != count * RECORD_DTYPE.itemsize:
        raise damaged(where, f"should hold {count} records ({count * RECORD_DTYPE.itemsize} bytes) "
                             f"but has {len(body)} bytes (truncated?)")
    records = np.frombuffer(body, dtype=RECORD_DTYPE)
    if count and int(np.ascontiguousarray(records["array"]).max()) >= len(arrays):
        raise damaged(where, "points at an array outside its header")
    return records, arrays, header


def _load_sealed(raw: bytes, where: str) -> dict[str, Any]:
    """Parse a self-checksummed JSON file: checksum first (any format version keeps the scheme),
    then the format version; format-1 files have no checksum."""
    data = _load_json(raw, where)
    found = data.get("format_version")
    sealed = isinstance(found, int) and not isinstance(found, bool) and found >= 2
    data = unseal(data, where, required=sealed)
    check_format_version(data, where)
    return data


def _load_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise damaged(where, f"is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise damaged(where, "should hold a JSON object")
    return data
