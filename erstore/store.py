"""Reading a store: `erstore.open(path, version=None)`.

A `Store` is one committed version of a store, frozen at open: later commits by other writers
do not change what it returns. It reads the version manifest and the key index eagerly (small)
and opens the zarr arrays lazily on first use. It never imports torch or transformers; the
tokenizer for `key_for(text)` is loaded only when that method is first called.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorstore as ts

from erstore.codecs import Codec, codec_from_dict, load_params
from erstore.errors import (
    ErstoreError,
    IncompatibleStoreError,
    KeyNotFoundError,
    StoreNotFoundError,
)
from erstore.index import KeyIndex
from erstore.integrity import MAX_MANIFEST, MAX_SMALL_JSON, damaged, unseal
from erstore.keys import join_key, key_for_ids, window_key
from erstore.keyset import KeySet
from erstore.location import Location
from erstore.manifest import (
    STORE_FILE,
    StoreMeta,
    VersionManifest,
    decode_index,
    parse_version_key,
    version_key,
)
from erstore.validate import (
    array_metadata,
    check_build_records,
    check_counts,
    check_documents,
    check_index,
    check_records,
    codec_json_cap,
    index_cap,
    read_checked,
    read_error,
)

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Entry:
    """One stored sequence: hidden states [n_tokens, d] and its token ids [n_tokens]."""

    key: str
    states: np.ndarray
    token_ids: np.ndarray
    boundary: int = 0


@dataclass(frozen=True)
class RawEntry:
    """One stored sequence as its codec stored it: row-aligned parts (codes, scales...) and ids.

    `params` are the codec parameters of the build that wrote it: `codec.decode(parts, params)`
    gives the states. Readers that decode elsewhere (on a GPU) use these.
    """

    key: str
    parts: dict[str, np.ndarray]
    token_ids: np.ndarray
    boundary: int
    params: dict[str, Any]


class PendingRead:
    """Reads issued by `Store.start_read`; `result()` waits for them and decodes, once."""

    def __init__(self, store: Store, spans: list[list], futures: list[Any], keys: list[str] | np.ndarray,
                 starts: list[int], stops: list[int], boundaries: list[int]):
        self._store, self._spans, self._futures = store, spans, futures
        self._given_keys, self._starts, self._stops, self._boundaries = keys, starts, stops, boundaries

    @property
    def _keys(self) -> list[str]:
        """Keys of the positions read; given, or made from their index records on first use (the
        Loader never asks, so a read group's keys are not formatted once per read)."""
        if isinstance(self._given_keys, np.ndarray):
            recs = self._given_keys
            self._given_keys = [join_key(hi, lo) for hi, lo in zip(recs["hi"].tolist(), recs["lo"].tolist())]
        return self._given_keys

    def result(self) -> list[Entry]:
        out: list[Entry] = [None] * len(self._keys)  # type: ignore[list-item]
        for slot, parts, t_rows, members in self._fetched():
            s_rows = self._store.codec.decode(parts, self._store._array(slot).params)
            for i, a, b in members:
                out[i] = Entry(self._keys[i], s_rows[a:b], t_rows[a:b], self._boundaries[i])
        return out

    def raw_result(self) -> list[RawEntry]:
        """Like `result()`, without decoding: each sequence's stored parts and codec parameters."""
        out: list[RawEntry] = [None] * len(self._keys)  # type: ignore[list-item]
        for slot, parts, t_rows, members in self._fetched():
            params = self._store._array(slot).params
            for i, a, b in members:
                out[i] = RawEntry(self._keys[i], {n: p[a:b] for n, p in parts.items()}, t_rows[a:b],
                                  self._boundaries[i], params)
        return out

    def spans(self) -> Iterator[tuple[int, int, list[int], dict[str, np.ndarray], np.ndarray]]:
        """Per merged span, once its reads finish: (build slot, first stored row, indices of the
        positions asked that lie in it, stored parts and token ids of its rows). Readers that lay
        out batches themselves (erstore.torchdata) take the rows from here."""
        for (slot, start, stop, members), futures in zip(self._spans, self._futures):
            parts, tokens = self._wait(slot, start, stop, members, futures)
            yield slot, start, members, parts, tokens

    def _fetched(self) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray, list[tuple[int, int, int]]]]:
        """Per span: its build slot, stored parts, token ids, and (member, first, end) rows in it."""
        for (slot, start, stop, members), futures in zip(self._spans, self._futures):
            parts, tokens = self._wait(slot, start, stop, members, futures)
            rows = [(i, self._starts[i] - start, self._stops[i] - start) for i in members]
            yield slot, parts, tokens, rows

    def _wait(self, slot: int, start: int, stop: int, members: list[int],
              futures: tuple[dict[str, Any], Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One span's stored parts and token ids; damage raises CorruptStoreError naming a key."""
        fs, ft = futures
        try:
            return {name: f.result() for name, f in fs.items()}, ft.result()
        except ValueError as e:  # DATA_LOSS (crc32c), a missing chunk, an undecodable chunk
            where = f"{self._store.location.url}/arrays/{self._store.index.arrays[slot]} rows {start}..{stop}"
            raise read_error(where, self._keys[members[0]], self._store.location.url, e) from e


def read_meta(location: Location) -> StoreMeta:
    raw = location.read_capped(STORE_FILE, MAX_SMALL_JSON)
    if raw is None:
        raise StoreNotFoundError(
            f"{location.url} is not an erstore store (no {STORE_FILE}); build one with "
            f"`erstore build --store {location.url}` or check the path"
        )
    return StoreMeta.from_json(raw, f"{location.url}/{STORE_FILE}")


def list_versions(location: Location) -> list[int]:
    """Committed version numbers, ascending."""
    if location.read_only:
        raw = location.read_capped("latest.json", MAX_SMALL_JSON)
        if not raw:
            return []
        latest = _small_sealed(raw, f"{location.url}/latest.json", "latest-version file")
        return list(range(1, latest + 1))
    return sorted(v for k in location.list("versions/") if (v := parse_version_key(k)) is not None)


def tag_key(name: str) -> str:
    return f"tags/{name}.json"


def resolve_tag(location: Location, name: str) -> int:
    """The version a tag (see `erstore tag`) points at."""
    if "/" in name or ".." in name:
        raise StoreNotFoundError(f"{name!r} is not a version number or tag name; see `erstore versions`")
    raw = location.read_capped(tag_key(name), MAX_SMALL_JSON)
    if raw is None:
        raise StoreNotFoundError(f"{location.url} has no version or tag {name!r}; see `erstore versions` "
                                 "and `erstore tag`")
    return _small_sealed(raw, f"{location.url}/{tag_key(name)}", "tag file")


def _small_sealed(raw: bytes, where: str, what: str) -> int:
    """The `version` of a tag or latest.json file, checked (sealed since format 2)."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError) as e:
        raise damaged(where, f"is not a valid {what} ({e})") from e
    found = data.get("format_version", 1)
    data = unseal(data, where, required=isinstance(found, int) and found >= 2)
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 10**8:
        raise damaged(where, f"is not a valid {what} (version {version!r})")
    return version


def read_manifest(location: Location, version: int) -> VersionManifest:
    raw = location.read_capped(version_key(version), MAX_MANIFEST)
    if raw is None:
        raise StoreNotFoundError(f"{location.url} has no version {version}")
    where = f"{location.url}/{version_key(version)}"
    manifest = VersionManifest.from_json(raw, where)
    if manifest.version != version:
        raise damaged(where, f"says it is version {manifest.version}")
    return manifest


def index_files(location: Location, manifest: VersionManifest, *,
                required: bool) -> Iterator[tuple[str, str, np.ndarray, list[str]]]:
    """(build, where, records, arrays) of each index file of `manifest`'s version, one file's
    bytes at a time: each file checked against the manifest (recorded size and checksum, and
    `required` to be recorded), present, and not past its build's record count."""
    for name in manifest.indexes:
        records = 0
        for relpath in manifest.index_paths(name):  # one file, or a large build's parts (format 3)
            where = f"{location.url}/{relpath}"
            raw = read_checked(location, manifest, relpath, cap=index_cap(manifest), required=required)
            if raw is None:
                raise damaged(where, "is missing")
            part, arrays = decode_index(raw, where)
            del raw
            records += len(part)
            check_build_records(records, manifest, where)
            yield name, where, part, arrays


def load_index(location: Location, manifest: VersionManifest | None, *, meta: StoreMeta | None = None) -> KeyIndex:
    """The key index of `manifest`'s version, every file checked against the manifest (and,
    given the store's `meta`, every record against the recipe and the manifest's counts)."""
    if manifest is None:
        return KeyIndex.merge([])
    required = meta is not None and meta.verified
    parts = [(part, arrays) for _, _, part, arrays in index_files(location, manifest, required=required)]
    index = KeyIndex.merge(parts)
    if meta is not None:
        check_index(index, manifest, meta.recipe, f"{location.url}/{version_key(manifest.version)}")
    index.manifest, index.verified = manifest, required
    return index


def load_keys(location: Location, manifest: VersionManifest | None, *, meta: StoreMeta) -> KeySet:
    """The keys of `manifest`'s version only (16 bytes each: what a writer needs to skip stored
    windows), each index file checked as `load_index` checks it, one file's bytes at a time."""
    if manifest is None:
        return KeySet()
    his, los, lengths = [], [], []
    for _, where, part, _ in index_files(location, manifest, required=meta.verified):
        check_records(part, where)
        his.append(np.ascontiguousarray(part["hi"]))
        los.append(np.ascontiguousarray(part["lo"]))
        lengths.append(np.ascontiguousarray(part["length"]))
        del part
    hi, lo, length = (np.concatenate(a) if a else np.zeros(0, dtype="<u8") for a in (his, los, lengths))
    del his, los, lengths
    order = np.argsort(hi)  # as KeyIndex: a sort by (hi, lo) only if some hi repeats
    if len(order) > 1 and (np.diff(hi[order]) == 0).any():
        order = np.lexsort((lo, hi))  # stable: the first occurrence (oldest build) is the one counted
    hi, lo, length = hi[order], lo[order], length[order]
    del order
    first = np.ones(len(hi), dtype=bool)
    first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    check_counts(int(first.sum()), int(length[first].sum(dtype=np.uint64)), manifest,
                 f"{location.url}/{version_key(manifest.version)}")
    return KeySet.from_sorted(hi[first], lo[first])


class Store:
    """A read-only view of one version of a store. Use `erstore.open` to get one."""

    def __init__(self, url: str | os.PathLike[str], *, version: int | str | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, **location_options: Any):
        self.location = Location.open(url, **location_options)
        self.options = {"cache_bytes": cache_bytes, **location_options}  # to reopen it alike elsewhere
        self.meta = read_meta(self.location)
        self.recipe = self.meta.recipe
        try:
            self.codec = codec_from_dict(self.recipe.codec)
        except (TypeError, ValueError) as e:
            if isinstance(e, IncompatibleStoreError):
                raise
            raise damaged(f"{self.location.url}/{STORE_FILE}", f"has an invalid codec ({e})") from e
        if isinstance(version, str):  # a tag name
            version = resolve_tag(self.location, version)
        versions = list_versions(self.location)
        if version is None:
            version = versions[-1] if versions else None
        elif version not in versions:
            raise StoreNotFoundError(
                f"{self.location.url} has no version {version}; it has "
                f"{', '.join(map(str, versions)) or 'none yet'} (see `erstore versions`)"
            )
        self.version = version
        self.manifest = read_manifest(self.location, version) if version else None
        self.index = load_index(self.location, self.manifest, meta=self.meta)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
        self._arrays: dict[int, BuildArrays] = {}
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._docs: dict[str, list[str]] | None = None

    # -- identity ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"<erstore.Store {self.location.url} version={self.version} "
                f"sequences={len(self)} layer={self.recipe.layer} model={self.recipe.model_name!r}>")

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[str]:
        return self.index.keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.index.find([key])[0] >= 0)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._arrays.clear()

    # -- keys -------------------------------------------------------------------------------
    def key_for_ids(self, token_ids: Sequence[int] | np.ndarray, *, boundaries: Sequence[int] = ()) -> str:
        return key_for_ids(token_ids, boundaries=boundaries)

    def tokenize(self, text: str, pair: str | None = None) -> list[tuple[list[int], int]]:
        """Token ids (and pair boundary) of each window of `text`, exactly as the build made them."""
        from erstore.tokenize import Windower

        if self._tokenizer is None:
            self._tokenizer = Windower.from_recipe(self.recipe)
        return self._tokenizer.windows(text, pair)

    def key_for(self, text: str, pair: str | None = None) -> str:
        """Key of `text` (or of a text pair) under this store's tokenizer.

        Raises `InvalidInputError` if the text is longer than max_length and so was stored as
        several windows; use `keys_for` then.
        """
        keys = self.keys_for(text, pair)
        if len(keys) != 1:
            from erstore.errors import InvalidInputError

            raise InvalidInputError(
                f"the text is split into {len(keys)} windows at max_length="
                f"{self.recipe.max_length}; use store.keys_for(text) to get all window keys"
            )
        return keys[0]

    def keys_for(self, text: str, pair: str | None = None) -> list[str]:
        """Keys of every window of `text`, in order."""
        return [window_key(ids, b) for ids, b in self.tokenize(text, pair)]

    def windows(self, doc_id: str) -> list[str]:
        """Keys of the windows of the corpus document `doc_id` (from the build's id field)."""
        if self._docs is None:
            self._docs = self.documents()
        try:
            return list(self._docs[str(doc_id)])
        except KeyError as e:
            raise KeyNotFoundError(
                f"document id {doc_id!r} is not in {self.location.url} version {self.version}"
            ) from e

    def documents(self) -> dict[str, list[str]]:
        """Document id -> window keys of every build of this version (each file checked)."""
        docs: dict[str, list[str]] = {}
        if self.manifest is None:
            return docs
        for n in self.manifest.indexes:
            build: dict[str, list[str]] = {}
            for relpath in self.manifest.docs_paths(n):  # a large build's map comes in parts
                raw = read_checked(self.location, self.manifest, relpath, cap=index_cap(self.manifest) * 64,
                                   required=self.meta.verified)
                build.update(check_documents(raw, f"{self.location.url}/{relpath}"))
            for doc, keys in build.items():  # an earlier build's entry wins, as its records do
                docs.setdefault(doc, keys)
        return docs

    # -- reads ------------------------------------------------------------------------------
    def get(self, key: str, *, with_token_ids: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Hidden states [n_tokens, d] of one sequence (and its token ids if asked)."""
        entry = self.read([key])[0]
        return (entry.states, entry.token_ids) if with_token_ids else entry.states

    def read(self, keys: Sequence[str]) -> list[Entry]:
        """Read many sequences with one storage call per array (not one per sequence)."""
        positions = self.index.find(list(keys))
        missing = [k for k, p in zip(keys, positions) if p < 0]
        if missing:
            raise KeyNotFoundError(
                f"{len(missing)} key(s) not in {self.location.url} version {self.version}, "
                f"e.g. {missing[0]}; check the key or open a version that has it"
            )
        return self.read_positions(positions, keys=list(keys))

    def read_positions(self, positions: np.ndarray, *, keys: list[str] | None = None) -> list[Entry]:
        """Read sequences by their position in commit order (0..len-1), in the order asked.

        Sequences that lie close together in one array (gaps under a quarter chunk) are fetched
        by one TensorStore read, and all reads go out as one `ts.Batch`: the ~0.1 ms per-call
        overhead otherwise dominates short sequences. Entries of one span are views of it.
        """
        return self.start_read(positions, keys=keys).result()

    def start_read(self, positions: np.ndarray, *, keys: list[str] | None = None) -> PendingRead:
        """Issue the reads of `read_positions` and return at once; `.result()` waits and decodes.

        TensorStore fetches and decompresses on its own threads, so a reader can prepare one
        batch while the next is being read (what `erstore.torchdata.Loader` does).
        """
        recs = self.index.records[np.asarray(positions, dtype=np.int64)]
        slots = recs["array"].astype(np.int64)
        starts = recs["row"].astype(np.int64)
        stops = starts + recs["length"].astype(np.int64)
        gap = max(1, self.codec.rows_per_chunk(self.recipe.hidden_size) // 4)
        spans: list[list] = []  # [slot, start, stop, member indices]
        if len(recs):
            # Sorted by (slot, start), a span ends where the next start lies more than `gap` past
            # the furthest stop so far. Vectorised: slot * width keeps the running maximum of
            # stops from crossing into the next slot.
            order = np.lexsort((starts, slots))
            width = int(stops.max()) + gap + 1
            s_slot, s_start = slots[order], starts[order]
            reach = np.maximum.accumulate(stops[order] + s_slot * width)
            new = np.r_[True, (s_slot[1:] != s_slot[:-1]) | (s_start[1:] + s_slot[1:] * width > reach[:-1] + gap)]
            first = np.flatnonzero(new)
            last = np.r_[first[1:], len(order)] - 1
            span_stop = reach[last] - s_slot[last] * width
            for a, b, slot, start, stop in zip(first.tolist(), (last + 1).tolist(), s_slot[first].tolist(),
                                               s_start[first].tolist(), span_stop.tolist()):
                spans.append([slot, start, stop, order[a:b].tolist()])
        starts, stops = starts.tolist(), stops.tolist()
        if keys is None:
            keys = recs  # formatted on first use (PendingRead._keys)
        with ts.Batch() as batch:
            futures = [self._array(slot).read(start, stop, batch) for slot, start, stop, _ in spans]
        return PendingRead(self, spans, futures, keys, starts, stops, recs["boundary"].tolist())

    def _array(self, slot: int) -> BuildArrays:
        handles = self._arrays.get(slot)
        if handles is None:
            with self._lock:
                handles = self._arrays.get(slot)
                if handles is None:
                    handles = open_arrays(self.location, self.index.arrays[slot], self.codec,
                                          self.recipe.hidden_size, self._context, manifest=self.manifest,
                                          verified=self.meta.verified)
                    self._arrays[slot] = handles
        return handles

    # -- torch (erstore.torchdata is imported only here) -------------------------------------
    def dataset(self, keys: Sequence[str] | None = None, *, labels: Any = None, **options: Any) -> Any:
        """A map-style torch `StoreDataset` over this version (all keys, `keys`, or labelled keys)."""
        from erstore.torchdata import StoreDataset

        return StoreDataset(self, keys=keys, labels=labels, **options)

    def loader(self, keys: Sequence[str] | None = None, *, labels: Any = None, dtype: Any = None,
               **options: Any) -> Any:
        """A prefetching `erstore.torchdata.Loader` over `self.dataset(keys, labels=labels)`.

        `dtype` (a torch dtype, default float32) is the dtype of the batches' `hidden_states`.
        """
        from erstore.torchdata import Loader

        dataset = self.dataset(keys, labels=labels, **({} if dtype is None else {"dtype": dtype}))
        return Loader(dataset, **options)

    def to_hf_dataset(self, keys: Sequence[str] | None = None, **options: Any) -> Any:
        """A `datasets.Dataset` of `keys` (default all): key, token_ids, boundary, states; see
        `erstore.export.to_hf_dataset` (imported only here)."""
        from erstore.export import to_hf_dataset

        return to_hf_dataset(self, keys, **options)

    def tokens(self, keys: Sequence[str] | None = None, **options: Any) -> Any:
        """A token-level feed (`erstore.tokens.TokenFeed`): shuffled batches of single token rows.

        `store.tokens(batch_size=4096, seed=0, drop_special=True)`; see erstore.tokens for options.
        """
        from erstore.tokens import TokenFeed

        return TokenFeed(self, keys, **options)

    # -- metadata ---------------------------------------------------------------------------
    def versions(self) -> list[VersionManifest]:
        return [read_manifest(self.location, v) for v in list_versions(self.location)]

    def info(self) -> dict[str, Any]:
        """Recipe, version, counts and format metadata as one JSON-ready dict."""
        m = self.manifest
        return {
            "store": self.location.url,
            "format_version": self.meta.format_version,
            "verified_reads": self.meta.verified,
            **({} if self.meta.verified else {"note": (
                f"format {self.meta.format_version} store: reads are unverified (no checksums of "
                "metadata files or chunks); rewrite it as a verified store with "
                f"`erstore copy {self.location.url} NEW_STORE`")}),
            "created": self.meta.created,
            "version": self.version,
            "versions": list_versions(self.location),
            "sequences": len(self),
            "tokens": self.index.total_tokens,
            "bytes": m.totals.bytes if m else 0,
            "recipe": self.recipe.to_dict(),
            "libraries": self.meta.libraries,
            "last_build": m.build if m else {},
        }


@dataclass(frozen=True)
class BuildArrays:
    """The arrays one build wrote: the codec's row-aligned parts, token ids, and codec params."""

    parts: dict[str, ts.TensorStore]
    tokens: ts.TensorStore
    params: dict[str, Any]

    def read(self, start: int, stop: int, batch: ts.Batch | None = None) -> tuple[dict[str, Any], Any]:
        """Futures of rows [start, stop) of every part and of the token ids."""
        parts = {n: a[start:stop].read(batch=batch) for n, a in sorted(self.parts.items())}
        return parts, self.tokens[start:stop].read(batch=batch)


def open_arrays(location: Location, array_id: str, codec: Codec, hidden_size: int,
                context: ts.Context | None = None, *, create: dict[str, dict[str, Any]] | None = None,
                params: dict[str, Any] | None = None, manifest: VersionManifest | None = None,
                verified: bool = False) -> BuildArrays:
    """Open (or, given `create` metadata per array name, create) the arrays of one build.

    Creating writes `params` as the build's codec.json. Opening checks each zarr.json and the
    codec.json against the sizes and checksums in `manifest` (required if `verified`), checks the
    array metadata is exactly what `codec` writes (chunk shapes, dtypes, codecs: a damaged
    zarr.json must not size an allocation), and, for arrays with chunk checksums (zstd's own),
    makes a missing chunk an error rather than zeros. Damage raises CorruptStoreError here.
    """
    handles = {}
    if create is None and location.is_local:
        from erstore.integrity import refuse_symlinks_out

        refuse_symlinks_out(location.spec["path"], f"arrays/{array_id}", f"{location.url}/arrays/{array_id}")
    for name in [*codec.arrays(hidden_size), "tokens"]:
        relpath = f"arrays/{array_id}/{name}"
        spec: dict[str, Any] = {"driver": "zarr3", "kvstore": location.child_spec(relpath)}
        if create is not None:
            # Chunks equal to the fill value are stored too, so that a missing chunk means damage.
            spec.update(metadata=create[name], create=True, store_data_equal_to_fill_value=True)
        else:  # a committed build's arrays never change: cached chunks need no revalidation
            raw = read_checked(location, manifest, f"{relpath}/zarr.json", cap=1 << 20, required=verified)
            metadata, checked = array_metadata(raw, codec, hidden_size, name, f"{location.url}/{relpath}/zarr.json",
                                               verified=verified)
            spec.update(open=True, metadata=metadata, recheck_cached_data=False, recheck_cached_metadata=False,
                        fill_missing_data_reads=not checked)
        try:
            handles[name] = ts.open(spec, context=context).result() if context else ts.open(spec).result()
        except ValueError as e:
            if create is None:
                raise damaged(f"{location.url}/{relpath}", f"cannot be opened as erstore wrote it ({e})") from e
            raise ErstoreError(f"cannot open arrays/{array_id}/{name} in {location.url}: {e}") from e
    params_key = f"arrays/{array_id}/codec.json"
    if create is not None:
        if params:
            location.write(params_key, json.dumps(params).encode())
    else:
        raw = read_checked(location, manifest, params_key, cap=codec_json_cap(hidden_size), required=verified,
                           optional=True)
        params = load_params(raw, codec, hidden_size, f"{location.url}/{params_key}")
    tokens = handles.pop("tokens")
    return BuildArrays(handles, tokens, params or {})
