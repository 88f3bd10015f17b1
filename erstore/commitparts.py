"""Writing a version's index and document map in parts, so a commit never holds them whole.

A build's index records come in blocks (read back from the writer's spill file, journals it
adopted, or ranks' gathered records); `IndexParts` drops those already committed or seen earlier
in this commit (first occurrence wins, as in `KeyIndex`), and writes the rest as index files of
`per_part` records each: part 0 is `index/<build>.idx` (so a build of up to `per_part` sequences
is written exactly as before), parts 1.. `index/<build>.pNNNNNN.idx`. The document map goes the
same way from `DocMap.parts()`. Memory: one part, plus 16 bytes per key that needs exact
deduplication (adopted records, ranks' records, a direct writer user's; not the builder's own,
which are unique by construction and recounted from the writer's spill file after a lost race).

Not here: the version manifest and its write-if-absent (`erstore.writer`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from erstore.index import KeyIndex
from erstore.keyset import KeySet
from erstore.location import Location
from erstore.manifest import RECORD_DTYPE, encode_index, part_paths
from erstore.validate import file_record

PART_RECORDS = 1 << 18  # records per index part: 11.5 MB


def renumbered(parts: Iterable[tuple[np.ndarray, list[str]]], arrays: list[str]) -> Iterator[np.ndarray]:
    """Record blocks whose `array` field points into `arrays` (extended in place as met)."""
    for records, local in parts:
        slots = []
        for a in local:
            if a not in arrays:
                arrays.append(a)
            slots.append(arrays.index(a))
        if not len(records):
            continue
        if slots == list(range(len(slots))):
            yield records  # already numbered as in the table
        else:
            block = records.copy()
            block["array"] = np.asarray(slots, dtype="<u4")[records["array"]]
            yield block


class IndexParts:
    """The index and document-map files of one build's version, written part by part."""

    def __init__(self, location: Location, build_id: str, arrays: list[str], committed: KeySet, *,
                 per_part: int = PART_RECORDS):
        self.location, self.build_id, self.arrays = location, build_id, arrays
        self.committed, self.per_part = committed, per_part
        self.keys = KeySet()  # every key this version adds
        self.files: dict[str, dict[str, Any]] = {}
        self.sequences = self.tokens = 0
        self.added_bytes = 0  # bytes of the arrays the version adds (set by the writer)
        self.index_parts = self.docs_parts = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def add(self, block: np.ndarray, *, remember: bool = True) -> None:
        """Queue records; those committed before or already added are dropped. `remember=False`:
        the caller knows these keys are unique and absent from every later block (the builder's
        own records), so they stay out of the deduplication set."""
        hi, lo = np.ascontiguousarray(block["hi"]), np.ascontiguousarray(block["lo"])
        keep = ~self.committed.contains_many(hi, lo)
        idx = np.flatnonzero(keep)
        if remember:
            keep[idx] = self.keys.add_many(hi[idx], lo[idx])
        elif len(self.keys):
            keep[idx] = ~self.keys.contains_many(hi[idx], lo[idx])
        block = block if keep.all() else block[keep]
        if not len(block):
            return
        self.sequences += len(block)
        self.tokens += int(block["length"].sum(dtype=np.uint64))
        self._pending.append(block)
        self._pending_rows += len(block)
        while self._pending_rows >= self.per_part:
            self._write_part(self.per_part)

    def finish_index(self) -> None:
        """Write the last, partial part (none if nothing is new)."""
        if self._pending_rows or (self.sequences and not self.index_parts):
            self._write_part(self._pending_rows)

    def _write_part(self, n: int) -> None:
        rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        part, rest = rows[:n], rows[n:]
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
        relpath = part_paths(self.build_id, ".idx", self.index_parts + 1)[-1]
        raw = encode_index(np.ascontiguousarray(part, dtype=RECORD_DTYPE), self.arrays)
        self.location.write(relpath, raw)
        self.files[relpath] = file_record(raw)
        self.index_parts += 1

    def write_docs(self, parts: Iterable[bytes]) -> None:
        """Write the document map, one JSON object per part (at least one)."""
        for raw in parts:
            relpath = part_paths(self.build_id, ".docs.json", self.docs_parts + 1)[-1]
            self.location.write(relpath, raw)
            self.files[relpath] = file_record(raw)
            self.docs_parts += 1

    @property
    def counts(self) -> list[int]:
        return [self.index_parts, self.docs_parts]

    def overlap(self, index: KeyIndex, unremembered: Iterable[np.ndarray] = ()) -> tuple[int, int]:
        """(sequences, tokens) of this version's keys that `index` holds too (after a lost race);
        keys added with `remember=False` come again as `unremembered` record blocks."""
        sequences = tokens = 0
        blocks = ((np.ascontiguousarray(b["hi"]), np.ascontiguousarray(b["lo"])) for b in unremembered)
        for hi, lo in itertools.chain(self.keys.runs(), blocks):
            found = index.find_halves(hi, lo)
            found = found[found >= 0]
            sequences += len(found)
            tokens += int(index.records["length"][found].sum(dtype=np.uint64))
        return sequences, tokens
