"""A compact set of 128-bit content keys: 16 bytes per key, whatever the number of keys.

A build must know which windows it has already seen (deduplication within the corpus) without
holding a Python `set` of hex strings (~130 bytes per key, which made memory grow with the
corpus). Keys live in sorted numpy runs of (hi, lo) uint64 pairs; runs of similar size are
merged as they come (like a binary counter), so there are O(log n) runs and each key is copied
O(log n) times over the life of the set. Look-ups are vectorised `searchsorted` calls per run.

Not here: deletion, persistence, or probabilistic tricks (a Bloom filter would save memory but
could skip a window that was never computed; exactness matters more).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from erstore.keys import split_key

_PENDING = 4096  # scalar adds wait in a small Python set before becoming a sorted run
# Runs stop merging at this size: merging two runs briefly needs ~3x their bytes, so uncapped the
# last merges of a 2M-key set would spike ~100 MB; capped, the spike stays ~7 MB and a look-up
# searches one more run per 2**17 keys (~20 us each: look-ups come in vectorised batches).
_MAX_RUN = 1 << 17


def halves(keys: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (hi, lo) uint64 arrays of hex keys."""
    pairs = [split_key(k) for k in keys]
    hi = np.fromiter((p[0] for p in pairs), dtype="<u8", count=len(pairs))
    lo = np.fromiter((p[1] for p in pairs), dtype="<u8", count=len(pairs))
    return hi, lo


class KeySet:
    """Exact set of (hi, lo) keys in sorted numpy runs; `nbytes` is 16 per key plus a small buffer."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # each sorted by (hi, lo), unique
        self._pending: set[tuple[int, int]] = set()
        self._count = 0

    @classmethod
    def from_sorted(cls, hi: np.ndarray, lo: np.ndarray) -> KeySet:
        """A set of keys already sorted by (hi, lo) and unique (one run, no copy)."""
        keys = cls()
        if len(hi):
            keys._runs.append((np.asarray(hi, dtype="<u8"), np.asarray(lo, dtype="<u8")))
            keys._count = len(hi)
        return keys

    def __len__(self) -> int:
        return self._count + len(self._pending)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes + lo.nbytes for h, lo in self._runs)

    def contains_many(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Boolean array: which of the keys are in the set."""
        hi, lo = np.asarray(hi, dtype="<u8"), np.asarray(lo, dtype="<u8")
        found = np.zeros(len(hi), dtype=bool)
        for run_hi, run_lo in self._runs:
            if not len(hi):
                break
            left = np.searchsorted(run_hi, hi, side="left")
            right = np.searchsorted(run_hi, hi, side="right")
            one = right - left == 1
            at = np.minimum(left, len(run_lo) - 1)
            found |= one & (run_lo[at] == lo)
            for i in np.flatnonzero(right - left > 1):  # a shared 64-bit prefix: astronomically rare
                found[i] |= bool((run_lo[left[i] : right[i]] == lo[i]).any())
        if self._pending:
            found |= np.fromiter(((int(h), int(w)) in self._pending for h, w in zip(hi, lo)),
                                 dtype=bool, count=len(hi))
        return found

    def add_many(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Add keys; return a boolean array marking those that were new (first occurrence only)."""
        hi, lo = np.asarray(hi, dtype="<u8"), np.asarray(lo, dtype="<u8")
        new = ~self.contains_many(hi, lo)
        if len(hi):  # duplicates inside this call: keep first occurrences
            order = np.lexsort((lo, hi))
            sh, sl = hi[order], lo[order]
            first = np.ones(len(order), dtype=bool)
            first[1:] = (sh[1:] != sh[:-1]) | (sl[1:] != sl[:-1])
            firsts = np.zeros(len(order), dtype=bool)
            # lexsort is stable, so within a group of equal keys the first index comes first
            firsts[order[first]] = True
            new &= firsts
        if new.any():
            idx = np.flatnonzero(new)
            self._push(hi[idx], lo[idx])
        return new

    def runs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every key, as sorted (hi, lo) arrays (one pair per run)."""
        if self._pending:
            self._flush_pending()
        yield from self._runs

    def add(self, key: str) -> None:
        self._pending.add(split_key(key))
        if len(self._pending) >= _PENDING:
            self._flush_pending()

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        hi, lo = split_key(key)
        return bool(self.contains_many(np.array([hi], dtype="<u8"), np.array([lo], dtype="<u8"))[0])

    def _flush_pending(self) -> None:
        pairs = self._pending
        self._pending = set()
        hi = np.fromiter((p[0] for p in pairs), dtype="<u8", count=len(pairs))
        lo = np.fromiter((p[1] for p in pairs), dtype="<u8", count=len(pairs))
        keep = ~self.contains_many(hi, lo)
        self._push(hi[keep], lo[keep])

    def _push(self, hi: np.ndarray, lo: np.ndarray) -> None:
        """Add keys known to be absent and unique as a new run, merging runs of similar size."""
        if not len(hi):
            return
        order = np.lexsort((lo, hi))
        self._runs.append((hi[order], lo[order]))
        self._count += len(hi)
        while (len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0])
               and len(self._runs[-2][0]) + len(self._runs[-1][0]) <= _MAX_RUN):
            (h1, l1), (h2, l2) = self._runs.pop(), self._runs.pop()
            h, lo_ = np.concatenate([h2, h1]), np.concatenate([l2, l1])
            order = np.lexsort((lo_, h))
            self._runs.append((h[order], lo_[order]))
