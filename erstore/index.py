"""The in-memory key index of one store version.

A version's index is the union of the `.idx` files of the builds it contains. Loading it costs
one sort (no Python object per key), so a million-sequence store opens in well under a second
and a look-up is a binary search: memory is the 44-byte record plus an 8-byte sort position.
The first occurrence of a key wins, so a sequence committed twice by racing writers is read from
the older build.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from erstore.keys import join_key, split_key
from erstore.manifest import RECORD_DTYPE


class KeyIndex:
    """Unique records in commit order plus a (hi, lo)-sorted view for look-ups."""

    def __init__(self, records: np.ndarray, arrays: list[str]):
        self.arrays = arrays
        # Set by `erstore.store.load_index`: the version manifest this index came from (sizes and
        # checksums of the version's files) and whether every file must be recorded there, so
        # readers handed only the index (the fork-safe `erstore.localread`) can check them too.
        self.manifest: Any = None
        self.verified = False
        hi = np.ascontiguousarray(records["hi"])
        lo = np.ascontiguousarray(records["lo"])
        order = np.argsort(hi)  # no need for stability unless keys repeat (handled below)
        hi_sorted = hi[order]
        if len(order) > 1 and (hi_sorted[1:] == hi_sorted[:-1]).any():
            # Duplicate keys (or a 64-bit prefix collision): sort by (hi, lo) and keep first occurrences.
            order = np.lexsort((lo, hi))  # stable: first occurrence first
            hi_sorted, lo_sorted = hi[order], lo[order]
            first = np.ones(len(order), dtype=bool)
            first[1:] = (hi_sorted[1:] != hi_sorted[:-1]) | (lo_sorted[1:] != lo_sorted[:-1])
            unique_sorted = order[first]
            kept = np.sort(unique_sorted)
            self.records = records[kept]
            self._sorted = np.searchsorted(kept, unique_sorted)
            self._hi, self._lo = hi_sorted[first], lo_sorted[first]
        else:  # the common case: every key once, no copy of the records
            self.records = records
            self._sorted = order
            self._hi, self._lo = hi_sorted, lo[order]

    @classmethod
    def merge(cls, parts: list[tuple[np.ndarray, list[str]]]) -> KeyIndex:
        """Combine index files, renumbering each file's local array ids into one table."""
        arrays: list[str] = []
        slot: dict[str, int] = {}
        chunks = []
        for records, local_arrays in parts:
            mapping = np.array([slot.setdefault(a, len(slot)) for a in local_arrays] or [0], dtype="<u4")
            for a in local_arrays:
                if a not in arrays:
                    arrays.append(a)
            if len(local_arrays) == 1 and mapping[0] == 0:
                chunks.append(records)  # already numbered as in the merged table
                continue
            remapped = records.copy()
            remapped["array"] = mapping[records["array"]]
            chunks.append(remapped)
        if len(chunks) == 1:
            return cls(chunks[0], arrays)
        merged = np.concatenate(chunks) if chunks else np.zeros(0, dtype=RECORD_DTYPE)
        return cls(merged, arrays)

    def __len__(self) -> int:
        return len(self.records)

    def keys(self) -> Iterator[str]:
        for hi, lo in zip(self.records["hi"].tolist(), self.records["lo"].tolist()):
            yield join_key(hi, lo)

    def find(self, keys: list[str]) -> np.ndarray:
        """Positions of `keys` in `records` (-1 where absent), one vectorised search."""
        if not keys:
            return np.zeros(0, dtype=np.int64)
        halves = np.array([split_key(k) for k in keys], dtype=np.uint64)
        return self.find_halves(halves[:, 0], halves[:, 1])

    def find_halves(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        hi = np.asarray(hi, dtype=np.uint64)
        lo = np.asarray(lo, dtype=np.uint64)
        left = np.searchsorted(self._hi, hi, side="left")
        right = np.searchsorted(self._hi, hi, side="right")
        out = np.full(len(hi), -1, dtype=np.int64)
        single = np.flatnonzero(right - left == 1)
        match = self._lo[left[single]] == lo[single]
        out[single[match]] = self._sorted[left[single[match]]]
        for i in np.flatnonzero(right - left > 1):
            # Runs longer than one only happen on a 64-bit prefix collision.
            for j in range(left[i], right[i]):
                if self._lo[j] == lo[i]:
                    out[i] = self._sorted[j]
                    break
        return out

    @property
    def total_tokens(self) -> int:
        return int(self.records["length"].sum(dtype=np.uint64))
