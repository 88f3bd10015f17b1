"""Which stored token rows a token-level feed visits, in what order, on which rank. No I/O here.

`token_blocks` cuts the rows of the chosen sequences (minus their first `drop_first` positions)
into blocks: the rows of one storage chunk (`block_rows` rows of one build's arrays) that belong
to chosen sequences. A block is the unit of reading: one TensorStore read decodes it whole.

`TokenPlan` turns per-block token counts into an epoch:

1. Ranks: blocks are dealt to ranks once per seed (a seeded permutation cut into `world_size`
   runs of about equal token counts), so ranks are disjoint and together hold every token; the
   split does not change with the epoch, so `len(plan)` does not either.
2. Each epoch permutes the rank's blocks and groups `buffer_blocks` consecutive ones into a
   shuffle window; the window's tokens are shuffled row by row (MosaicML Streaming / LitData
   style). The rank's stream is the concatenation of its shuffled windows, cut into batches of
   `batch_size` tokens, so every token of the rank comes exactly once per epoch.
3. The stream is a pure function of (seed, epoch, rank): batch `step` starts at token
   `step * batch_size` of it, so resuming reads only the window that holds it (`locate`).

With `shuffle=False` blocks keep storage order and windows are not shuffled (sequential reads).
Not here: weighting several stores, or uniform sampling with replacement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from erstore.errors import InvalidInputError


@dataclass(frozen=True)
class Blocks:
    """Pieces (runs of rows of one sequence inside one block) and the blocks they form.

    Piece arrays are sorted by (slot, start); block b owns pieces [first[b], first[b + 1]).
    `seq` is the sequence's position in the store's index, `pos0` the in-sequence position of
    the piece's first row. `lo`/`hi` are the rows a block read covers (its pieces' extent).
    """

    p_start: np.ndarray
    p_stop: np.ndarray
    p_seq: np.ndarray
    p_pos0: np.ndarray
    slot: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    first: np.ndarray

    def __len__(self) -> int:
        return len(self.slot)

    def rows(self) -> np.ndarray:
        """Chosen rows per block (before any token-id filter)."""
        sizes = self.p_stop - self.p_start
        return np.add.reduceat(sizes, self.first[:-1]) if len(self) else np.zeros(0, np.int64)


def token_blocks(slot: np.ndarray, row: np.ndarray, length: np.ndarray, seq: np.ndarray, *,
                 drop_first: int | np.ndarray, block_rows: int) -> Blocks:
    """Blocks of the rows [row + drop_first, row + length) of each sequence (vectorised;
    `drop_first` is one number or one per sequence)."""
    slot, row, length, seq = (np.asarray(a, dtype=np.int64) for a in (slot, row, length, seq))
    start = row + np.minimum(length, drop_first)
    stop = row + length
    keep = stop > start
    slot, row, start, stop, seq = slot[keep], row[keep], start[keep], stop[keep], seq[keep]
    first_b, last_b = start // block_rows, (stop - 1) // block_rows
    count = last_b - first_b + 1
    which = np.repeat(np.arange(len(start)), count)
    within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    blk = first_b[which] + within
    p_start = np.maximum(start[which], blk * block_rows)
    p_stop = np.minimum(stop[which], (blk + 1) * block_rows)
    p_slot = slot[which]
    order = np.lexsort((p_start, p_slot))
    p_start, p_stop, p_slot, blk, which = p_start[order], p_stop[order], p_slot[order], blk[order], which[order]
    n = len(order)
    new = np.r_[True, (p_slot[1:] != p_slot[:-1]) | (blk[1:] != blk[:-1])] if n else np.zeros(0, bool)
    first = np.r_[np.flatnonzero(new), n].astype(np.int64)
    lo = p_start[first[:-1]]
    hi = np.maximum.reduceat(p_stop, first[:-1]) if n else np.zeros(0, np.int64)
    return Blocks(p_start, p_stop, seq[which], p_start - row[which], p_slot[first[:-1]], lo, hi, first)


class TokenPlan:
    """The epoch order of one rank's token stream (see the module docstring).

    Args:
        counts: tokens each block contributes (after filters).
        batch_size: tokens per batch.
        shuffle, seed: seeded block permutation plus row shuffle within windows.
        buffer_blocks: blocks per shuffle window.
        rank, world_size: this process's share.
        drop_last: only full batches; with world_size > 1 every rank then gets the same number.
    """

    def __init__(self, counts: np.ndarray, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 buffer_blocks: int = 256, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise InvalidInputError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if buffer_blocks < 1:
            raise InvalidInputError(f"buffer_blocks must be at least 1, got {buffer_blocks}")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.buffer_blocks, self.rank, self.world_size = buffer_blocks, rank, world_size
        owner = self._owners()
        self.blocks = np.flatnonzero(owner == rank)  # in storage order
        totals = np.bincount(owner, weights=self.counts, minlength=world_size).astype(np.int64)
        self.tokens = int(totals[rank])
        if drop_last:
            self.batches = int(totals.min()) // batch_size if world_size > 1 else self.tokens // batch_size
        else:
            self.batches = -(-self.tokens // batch_size)

    def _owners(self) -> np.ndarray:
        """Rank of each block: a seeded permutation cut where the running token count crosses
        multiples of total / world_size (judged at each block's middle: balanced within a block)."""
        n = len(self.counts)
        if self.world_size == 1:
            return np.zeros(n, dtype=np.int64)
        order = np.random.default_rng([self.seed, 0x7E57]).permutation(n) if self.shuffle else np.arange(n)
        c = self.counts[order]
        total = max(1, int(c.sum()))
        middle = np.cumsum(c) - c / 2
        owner = np.empty(n, dtype=np.int64)
        owner[order] = np.minimum((middle * self.world_size // total).astype(np.int64), self.world_size - 1)
        return owner

    def __len__(self) -> int:
        return self.batches

    def windows(self, epoch: int) -> list[np.ndarray]:
        """This rank's blocks of `epoch`, grouped into shuffle windows, in stream order."""
        blocks = self.blocks
        if self.shuffle:
            blocks = np.random.default_rng([self.seed, epoch, 1]).permutation(blocks)
        return [blocks[i : i + self.buffer_blocks] for i in range(0, len(blocks), self.buffer_blocks)]

    def row_order(self, epoch: int, window: int, n: int) -> np.ndarray:
        """The order of a window's n tokens: a pure function of (seed, epoch, rank, window)."""
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, 2, self.rank, window]).permutation(n)

    def span(self, start: int = 0) -> tuple[int, int]:
        """Token offsets [first, end) of the stream that batches `start`.. cover."""
        end = min(self.tokens, self.batches * self.batch_size)
        return min(end, start * self.batch_size), end
