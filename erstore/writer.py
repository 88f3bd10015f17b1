"""Writing a store: append sequences as one build, then commit them as one new version.

Commit protocol (the same on local disk and object storage, no locks, no coordinator):

1. A build writes its rows into fresh arrays `arrays/<build>/` that no version references yet.
2. Every flush, once its chunks are durable, writes `journal/<build>/<n>.idx`: the sequences
   whose rows are now safe, with a checksum of its own, and, when the builder has marked how
   far its input is complete (`mark_input`), that resume point (see erstore.journal). A flush
   happens every `flush_bytes` and at least every `journal_seconds` (10 s), so a killed build
   loses seconds of work. A killed build leaves the journals behind; the next build of the
   same store adopts the intact ones, so it recomputes only what was never made durable (and
   the builder skips the durable input without tokenizing it). Each journal holds only the
   records since the previous one; journaled records also go to a local temporary file, not
   to memory.
3. At the end the build streams those records (and adopted ones) into `index/<build>.idx` and,
   past 2**18 records, further parts, then the document map likewise (erstore.commitparts),
   and writes `versions/<N+1>.json` with a write-if-absent. That single conditional write is
   the commit: readers only ever follow version manifests, so they never see a half-written
   build. If another writer took N+1 first, we re-read its version and try N+2 (our data is
   untouched by theirs). Journals and commit cost O(new data) in time and one part in memory.

Duplicated keys across racing builds are harmless: the index keeps the first occurrence.
Not here: deleting unreferenced arrays (space reclamation) and copying between stores.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorstore as ts
import xxhash

from erstore.codecs import codec_from_dict
from erstore.commitparts import PART_RECORDS, IndexParts, renumbered
from erstore.docmap import PART_DOCUMENTS, DocMap
from erstore.errors import CommitConflictError, IncompatibleStoreError, InvalidInputError, StoreNotFoundError
from erstore.index import KeyIndex
from erstore.integrity import seal
from erstore.journal import ResumePoint, adopt, journal_path
from erstore.keys import split_key
from erstore.keyset import KeySet, halves
from erstore.location import Location, holds_other_files
from erstore.manifest import (
    RECORD_DTYPE,
    STORE_FILE,
    Counts,
    Recipe,
    StoreMeta,
    VersionManifest,
    encode_index,
    version_key,
)
from erstore.store import (
    BuildArrays,
    list_versions,
    load_index,
    load_keys,
    open_arrays,
    read_manifest,
)
from erstore.validate import MAX_SEQUENCE_ROWS, array_file_records, file_record

FLUSH_BYTES = 16 * 1024 * 1024
JOURNAL_SECONDS = 10.0  # a killed build loses about this much work plus one batch
COMMIT_ATTEMPTS = 50


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def new_build_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("erstore", "tensorstore", "numpy", "torch", "transformers", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def checksum(parts: dict[str, np.ndarray], token_ids: np.ndarray) -> int:
    """xxh3-64 of a sequence's stored bytes (every codec part, by name, then token ids),
    recorded at write time and checked by verify."""
    h = xxhash.xxh3_64()
    for name in sorted(parts):
        h.update(memoryview(np.ascontiguousarray(parts[name]).view(np.uint8)))
    h.update(memoryview(np.ascontiguousarray(token_ids, dtype="<i4").view(np.uint8)))
    return h.intdigest()


def _array_meta_like(states_meta: dict[str, Any], chunk_rows: int) -> dict[str, Any]:
    """zarr3 metadata of the int32 token id array, with the states' codecs and row count."""
    return {**states_meta, "shape": [states_meta["shape"][0]], "data_type": "int32",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows]}},
            "codecs": [c for c in states_meta["codecs"] if c["name"] != "transpose"]}


def ensure_store(location: Location, recipe: Recipe) -> tuple[StoreMeta, bool]:
    """Create the store if absent; otherwise check that `recipe` matches the stored one.

    Returns the store's metadata and whether this call created it (won the write-if-absent)."""
    location.check_writable()
    raw = location.read(STORE_FILE)
    if raw is None:
        if location.is_local and holds_other_files(location.spec["path"]) and location.read(STORE_FILE) is None:
            raise StoreNotFoundError(
                f"{location.spec['path']} exists, is not empty and is not an erstore store "
                f"(no {STORE_FILE}); choose an empty or new --store path"
            )
        meta = StoreMeta(recipe, utc_now(), library_versions())
        if location.write_if_absent(STORE_FILE, meta.to_json()):
            return meta, True
        raw = location.read(STORE_FILE)  # another writer created it first
    meta = StoreMeta.from_json(raw or b"", f"{location.url}/{STORE_FILE}")
    diffs = meta.recipe.differences(recipe)
    if diffs:
        raise IncompatibleStoreError(
            f"{location.url} holds a store built with another recipe ({'; '.join(diffs)}). "
            "Build into a different --store, or use the store's settings"
        )
    return meta, False


class StoreWriter:
    """One build of a store. Use as a context manager; call `commit()` to publish it.

    Example:
        with StoreWriter("./stores/x", recipe) as w:
            if not w.contains(key):
                w.append(key, states, token_ids)
            w.commit(build={"corpus": "docs.jsonl"})
    """

    def __init__(self, url: str | os.PathLike[str], recipe: Recipe, *,
                 flush_bytes: int = FLUSH_BYTES, journal_seconds: float = JOURNAL_SECONDS,
                 track_new_keys: bool = True, part_records: int = PART_RECORDS,
                 part_documents: int = PART_DOCUMENTS, **location_options: Any):
        self.location = Location.open(url, **location_options)
        # Only the writer whose write-if-absent made erstore.json may remove it (see discard).
        self.meta, self.created_store = ensure_store(self.location, recipe)
        self.recipe = self.meta.recipe
        self.codec = codec_from_dict(self.recipe.codec)
        self.build_id = new_build_id()
        versions = list_versions(self.location)
        self._base = read_manifest(self.location, versions[-1]) if versions else None
        # Only the committed keys (16 bytes each), not the index records: an incremental build
        # of a large store needs to know what is stored, not where (0.94 s and ~68 bytes per
        # sequence for a full KeyIndex).
        self.committed = load_keys(self.location, self._base, meta=self.meta)
        self.journals = adopt(self.location)
        self._adopted = self.journals.parts
        # Adopted rows get their own small look-up index: merging them with the committed one
        # would copy the whole store's index (O(store) memory) for an incremental build.
        self._adopted_index = KeyIndex.merge(self._adopted) if self._adopted else None
        self.part_records, self.part_documents = part_records, part_documents

        d = self.recipe.hidden_size
        self._metadata = self.codec.arrays(d)
        self._unit = self.codec.rows_per_chunk(d) * 4  # tokens chunks are 4x taller; flush whole chunks
        row_bytes = max(1.0, d * float(self.codec.itemsize))
        self._flush_rows = max(self._unit, int(flush_bytes // row_bytes) // self._unit * self._unit)
        self.journal_seconds = journal_seconds
        self._arrays: BuildArrays | None = None
        self._params: dict[str, Any] | None = None
        self._raw: list[np.ndarray] = []  # appended states not yet encoded
        self._raw_tokens: list[np.ndarray] = []
        self._raw_rows = 0
        self._encoded: dict[str, np.ndarray] = {}  # encoded rows not yet handed to TensorStore
        self._encoded_tokens = np.zeros(0, dtype="<i4")
        self._written_rows = 0  # rows handed to TensorStore
        # Index records: appended (tuples, until encoded) -> encoded (arrays, until their rows
        # are durable) -> journaled (44 bytes each in `_spill`, a local temporary file the commit
        # reads back in parts): memory does not grow with the build.
        self._fresh: list[tuple] = []  # (hi, lo, row, checksum, array, length, boundary), not encoded
        self._unjournaled: list[np.ndarray] = []
        self._spill = tempfile.TemporaryFile(prefix="erstore-index-")  # noqa: SIM115 - closed in close()
        self._journaled = 0  # records covered by journal files
        self._appended = 0  # records appended so far
        # Resume points (see erstore.journal): (records appended by then, documents, digest,
        # document-map bytes), journaled once those records are durable.
        self._marks: list[tuple[int, int, str, int]] = []
        self._docs_journaled = 0  # document-map bytes already in journals
        self._needs = {b: n for b, n in self.journals.records.items()}
        self._pending: list[Any] = []  # write futures of the last flush
        self._journal_seq = 0
        self._last_flush = time.monotonic()
        # What `contains`/`missing` need about this build's own appends (16 bytes per sequence);
        # the builder deduplicates with its own KeySet and turns this off.
        self._new_keys = KeySet() if track_new_keys else None
        self._docs = DocMap()
        self.closed = False

    # -- what is already there ---------------------------------------------------------------
    def contains(self, key: str) -> bool:
        """True if `key` is committed, adopted from an interrupted build, or appended here
        (appended keys only with `track_new_keys`, the default)."""
        return (self._new_keys is not None and key in self._new_keys) or bool(self.stored(*halves([key]))[0])

    def missing(self, keys: list[str]) -> list[bool]:
        """Vectorised `not contains` for many keys."""
        found = self.stored(*halves(keys)) if keys else np.zeros(0, dtype=bool)
        if self._new_keys is not None and len(self._new_keys):
            found |= self._new_keys.contains_many(*halves(keys))
        return [not f for f in found]

    def stored(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Which keys are committed or adopted (not those appended by this build).

        Reads only structures fixed at open, so a builder may call it while another thread appends.
        """
        found = self.committed.contains_many(hi, lo)
        if self._adopted_index is not None:
            found |= self._adopted_index.find_halves(hi, lo) >= 0
        return found

    @property
    def adopted_sequences(self) -> int:
        return sum(len(r) for r, _ in self._adopted)

    # -- appending ---------------------------------------------------------------------------
    def append(self, key: str, states: np.ndarray, token_ids: np.ndarray, *, boundary: int = 0) -> None:
        """Buffer one sequence (states [n, d], token ids [n]); flushed in whole chunks, and at
        least every `journal_seconds` so that a killed build loses only seconds of work."""
        if states.ndim != 2 or states.shape[1] != self.recipe.hidden_size or len(states) != len(token_ids):
            raise ValueError(
                f"expected states [n, {self.recipe.hidden_size}] and n token ids, got "
                f"{states.shape} and {len(token_ids)}"
            )
        if len(token_ids) > MAX_SEQUENCE_ROWS:  # readers refuse longer records as damage
            raise InvalidInputError(f"a sequence of {len(token_ids)} tokens is longer than the {MAX_SEQUENCE_ROWS} "
                                    "a store can hold in one record; split it into windows")
        hi, lo = split_key(key)
        row = self._written_rows + len(self._encoded_tokens) + self._raw_rows
        self._fresh.append((hi, lo, row, 0, 0, len(token_ids), boundary))
        self._appended += 1
        self._raw.append(states)
        self._raw_tokens.append(np.asarray(token_ids, dtype="<i4"))
        self._raw_rows += len(token_ids)
        if self._new_keys is not None:
            self._new_keys.add(key)
        if self._raw_rows + len(self._encoded_tokens) >= self._flush_rows:
            self._flush(final=False)
        elif time.monotonic() - self._last_flush >= self.journal_seconds:
            self._flush(final=False, partial=True)
        elif self._pending and all(f.done() for f in self._pending):
            self._wait_and_journal()  # journal as soon as the last flush is durable, not at the next

    def add_document(self, doc_id: str, keys: list[str]) -> None:
        """Record that corpus document `doc_id` is stored as the windows `keys`."""
        self._docs.add(str(doc_id), keys)

    def add_document_lines(self, block: bytes, count: int) -> None:
        """Record `count` documents at once, as `erstore.docmap.entry_line` lines (the builder)."""
        self._docs.add_lines(block, count)

    @property
    def docs_bytes(self) -> int:
        """Bytes of document-map lines recorded so far (the offset a resume point refers to)."""
        return self._docs.nbytes

    def mark_input(self, documents: int, digest: str, docs_bytes: int) -> None:
        """Every window of the first `documents` input documents (digest of them as read:
        `digest`; their map lines: the first `docs_bytes`) has been appended or was stored
        before. Journaled as a resume point once those rows are durable (see erstore.journal).
        Called in order with `append` (on the write-behind thread)."""
        self._marks.append((self._appended, documents, digest, docs_bytes))

    def resume(self, point: ResumePoint) -> bytes:
        """Take over `point`'s documents (an interrupted build's durable input); return their
        document-map lines, for the builder to rebuild its deduplication set from."""
        if self._docs.nbytes:
            raise RuntimeError("resume() must come before any document is added")
        lines = self.journals.read_docs(self.location, point)
        self._docs.add_lines(lines, lines.count(b"\n"))
        return lines

    def _encode_buffered(self) -> None:
        """Encode appended rows in one vectorised call and record each sequence's checksum."""
        if not self._raw:
            return
        states = np.concatenate(self._raw)
        tokens = np.concatenate(self._raw_tokens)
        if self._params is None:  # lossy codecs fit per-build parameters on the first rows
            self._params = self.codec.fit(np.asarray(states, dtype=np.float32))
        parts = self.codec.encode(states, self._params)
        base = self._written_rows + len(self._encoded_tokens)
        records = np.array(self._fresh, dtype=RECORD_DTYPE)
        for i, (row, length) in enumerate(zip(records["row"] - base, records["length"])):
            records["checksum"][i] = checksum({n: p[row : row + length] for n, p in parts.items()},
                                              tokens[row : row + length])
        self._unjournaled.append(records)
        self._fresh = []
        self._encoded = {n: np.concatenate([self._encoded[n], p]) if n in self._encoded else p
                         for n, p in parts.items()}
        self._encoded_tokens = np.concatenate([self._encoded_tokens, tokens])
        self._raw, self._raw_tokens, self._raw_rows = [], [], 0

    def _flush(self, *, final: bool, partial: bool = False) -> None:
        """Hand encoded rows to TensorStore: whole chunks, or everything when `final`/`partial`.

        A partial flush (by time) may end inside a chunk; the next flush writes the rest of that
        chunk (TensorStore reads, modifies and rewrites it) and realigns to chunk boundaries.
        """
        self._wait_and_journal()
        self._encode_buffered()
        self._last_flush = time.monotonic()
        rows = len(self._encoded_tokens)
        if final or partial:
            n = rows
        else:
            n = (self._written_rows + rows) // self._unit * self._unit - self._written_rows
        if n <= 0:
            if final:
                self._seal()
            return
        if self._arrays is None:
            tokens = _array_meta_like(self._metadata["states"], self._unit)
            self._arrays = open_arrays(self.location, self.build_id, self.codec, self.recipe.hidden_size,
                                       create={**self._metadata, "tokens": tokens}, params=self._params)
        start, stop = self._written_rows, self._written_rows + n
        self._pending = [self._arrays.parts[name][start:stop].write(part[:n])
                         for name, part in self._encoded.items()]
        self._pending.append(self._arrays.tokens[start:stop].write(self._encoded_tokens[:n]))
        self._encoded = {name: part[n:] for name, part in self._encoded.items()}
        self._encoded_tokens = self._encoded_tokens[n:]
        self._written_rows = stop
        if final:
            self._wait_and_journal()
            self._seal()

    def _seal(self) -> None:
        """Shrink this build's arrays from MAX_ROWS (created that long so appends never rewrite
        metadata) to the rows written, so plain zarr readers see their real shape."""
        if self._arrays is None:
            return
        for array in [*self._arrays.parts.values(), self._arrays.tokens]:
            shape = array.shape
            if shape[0] != self._written_rows:
                array.resize(exclusive_max=[self._written_rows, *shape[1:]], resize_metadata_only=True,
                             shrink_only=True).result()

    def _wait_and_journal(self) -> None:
        """Wait for the last flush to be durable, then journal the sequences it completed."""
        if not self._pending:
            return
        for future in self._pending:
            future.result()
        self._pending = []
        if not self._unjournaled:
            return
        records = np.concatenate(self._unjournaled)
        ends = records["row"] + records["length"]
        done = int(np.searchsorted(ends, self._written_rows, side="right"))  # rows are in order
        durable = [m for m in self._marks if m[0] <= self._journaled + done]
        if done or durable:
            extra = None
            if durable:  # the newest resume point whose rows are now all durable
                _, documents, digest, docs_bytes = durable[-1]
                self._marks = self._marks[len(durable):]
                lines = self._docs.read(self._docs_journaled, docs_bytes)
                self.location.write(journal_path(self.build_id, self._journal_seq, ".docs"), lines)
                self._docs_journaled = docs_bytes
                extra = {"input": {"documents": documents, "digest": digest, "docs": file_record(lines),
                                   "needs": self._needs}}
            name = journal_path(self.build_id, self._journal_seq)
            self.location.write(name, encode_index(records[:done], [self.build_id], extra=extra, sealed=True))
            self._journal_seq += 1
            self._journaled += done
            self._spill.write(records[:done].tobytes())
        self._unjournaled = [records[done:]] if done < len(records) else []

    def own_blocks(self, rows: int = PART_RECORDS) -> Iterator[np.ndarray]:
        """Index records of every sequence this build made durable (after a final flush), read
        back from the spill file in blocks of `rows`."""
        self._spill.flush()
        size = RECORD_DTYPE.itemsize
        for start in range(0, self._journaled, rows):
            n = min(rows, self._journaled - start)
            raw = os.pread(self._spill.fileno(), n * size, start * size)
            yield np.frombuffer(raw, dtype=RECORD_DTYPE)

    def own_records(self) -> np.ndarray:
        """All of `own_blocks` in one array (a distributed rank sends them to rank 0)."""
        blocks = list(self.own_blocks())
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=RECORD_DTYPE)

    # -- committing --------------------------------------------------------------------------
    def commit(self, *, build: dict[str, Any] | None = None) -> VersionManifest | None:
        """Publish everything appended (and adopted) as one new version; None if nothing is new.

        The index and document map are streamed to their part files (see erstore.commitparts):
        the commit holds one part at a time, never the whole build's index.
        """
        self._flush(final=True)
        arrays = [self.build_id]
        blocks = renumbered(itertools.chain(((b, [self.build_id]) for b in self.own_blocks(self.part_records)),
                                            self._adopted), arrays)
        # The builder (track_new_keys=False) appends each key once and never one it was told is
        # stored or adopted, so its own records need no deduplication set (16 bytes each, and
        # look-ups that grew with the build); adopted ones, and a direct user's, get one.
        trusted = self._journaled if self._new_keys is None else 0
        parts = self.write_parts(blocks, arrays, self._docs.parts(self.part_documents), trusted=trusted)
        if parts is None:
            self._cleanup_journals()
            self._finish()
            return None
        info = {"libraries": library_versions(), **(build or {})}
        manifest = self._publish(parts, info)
        self._cleanup_journals()
        self._finish()
        return manifest

    def write_parts(self, blocks: Iterable[np.ndarray], arrays: list[str],
                    docs: Iterable[bytes], *, trusted: int = 0) -> IndexParts | None:
        """Write this version's index (from record `blocks` numbered into `arrays`, which may
        grow as blocks are read) and document map, part by part; None if no record is new.
        The manifest will record every file written and the arrays' metadata files."""
        parts = IndexParts(self.location, self.build_id, arrays, self.committed, per_part=self.part_records)
        for block in blocks:
            parts.add(block, remember=trusted <= 0)  # the first `trusted` records are known unique
            trusted -= len(block)
        parts.finish_index()
        if not parts.sequences:
            return None
        parts.write_docs(docs)
        for a in arrays:
            parts.files.update(array_file_records(self.location, a, self.codec, self.recipe.hidden_size))
        parts.added_bytes = sum(self.location.size_of_prefix(f"arrays/{a}/") for a in arrays)
        return parts

    def _publish(self, parts: IndexParts, info: dict[str, Any]) -> VersionManifest:
        """Commit the written parts as the next version (write-if-absent; rebase on a lost race)."""
        base = self._base
        sequences, tokens = parts.sequences, parts.tokens
        many = {self.build_id: parts.counts} if parts.counts != [1, 1] else {}
        for _ in range(COMMIT_ATTEMPTS):
            added = Counts(sequences, tokens, parts.added_bytes)
            totals = base.totals if base else Counts()
            manifest = VersionManifest(
                version=(base.version if base else 0) + 1,
                created=utc_now(),
                indexes=(*(base.indexes if base else ()), self.build_id),
                added=added,
                totals=Counts(totals.sequences + added.sequences, totals.tokens + added.tokens,
                              totals.bytes + added.bytes),
                build=info,
                parent=base.version if base else None,
                files={**(base.files if base else {}), **parts.files},
                parts={**(base.parts if base else {}), **many},
            )
            if self.location.write_if_absent(version_key(manifest.version), manifest.to_json()):
                self.location.write("latest.json", seal({"format_version": 2, "version": manifest.version}))
                return manifest
            # Lost the race: rebase onto the version that won and try the next number. Keys the
            # winner added too stay in our index files (readers keep the first occurrence) but
            # are not counted twice.
            latest = list_versions(self.location)[-1]
            base = read_manifest(self.location, latest)
            trusted = self.own_blocks() if self._new_keys is None else ()  # not in the parts' key set
            same, same_tokens = parts.overlap(load_index(self.location, base), trusted)
            sequences, tokens = parts.sequences - same, parts.tokens - same_tokens
        raise CommitConflictError(
            f"could not commit to {self.location.url} after {COMMIT_ATTEMPTS} attempts; "
            "other writers keep committing. Retry the build: it will skip what they stored"
        )

    def _cleanup_journals(self) -> None:
        """Journals are only a resume aid; once committed (or superseded) they can go."""
        builds = {self.build_id, *(a for _, arrays in self._adopted for a in arrays)}
        for b in builds:
            self.location.delete_prefix(f"journal/{b}/")

    def _finish(self) -> None:
        self.closed = True
        self._docs.close()
        self._spill.close()

    def close(self) -> None:
        """Stop without committing: durable rows stay journaled for the next build to adopt."""
        if not self.closed:
            try:
                self._wait_and_journal()
            finally:
                self._pending = []
                self._finish()

    def discard(self) -> bool:
        """After a failed build: remove the store this writer created, if nothing durable came of
        it (no version, no journal). Returns True if it removed the store.

        A bad input found only once the build streams (a malformed line deep in the corpus) then
        leaves no store behind, as one found before the start does.
        """
        self.close()
        if not self.created_store or self._journal_seq:
            return False
        if self.location.list("versions/") or self.location.list("journal/"):
            return False
        self.location.delete_prefix(f"arrays/{self.build_id}/")
        self.location.kv.delete_range(ts.KvStore.KeyRange(STORE_FILE, STORE_FILE + "\x00")).result()
        if self.location.is_local:
            root = self.location.spec["path"]
            with contextlib.suppress(OSError):  # not empty: someone else is writing here
                for folder, _, _ in os.walk(root, topdown=False):
                    os.rmdir(folder)
        return True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

