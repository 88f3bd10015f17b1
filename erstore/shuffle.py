"""The order in which a reader visits sequences: seeded, resumable, block-aware, sharded.

`BatchPlan` turns the storage locations of N sequences into the batches of one epoch:

1. Blocks: sequences are grouped by where they start in storage (array, then `block_rows` rows),
   so one block is a run of neighbours that share a chunk or two.
2. The blocks are permuted, then a window of `buffer_blocks` consecutive blocks is shuffled
   sequence by sequence (MosaicML Streaming / LitData style). A batch therefore touches a few
   recently read chunks, which TensorStore's cache pool still holds: shuffled reads cost about
   what sequential reads cost, while any two sequences still have a chance to share a batch.
3. Distributed: the epoch order is padded (by repeating its start, like `DistributedSampler`) or
   trimmed (`drop_last`) to a multiple of `world_size`, and rank r takes the r-th contiguous
   share, so ranks are disjoint, together complete, and all get the same number of batches.
4. Optional length bucketing: inside each shuffle window the share is sorted by length before
   cutting batches and the window's batches are shuffled, which cuts padding without a global
   sort and keeps each window's reads together.

The order is a pure function of (seed, epoch): resuming at (epoch, step) just skips `step`
batches. No torch here; `BatchPlan` is a valid `batch_sampler` for `torch.utils.data.DataLoader`.
Not here: weighting or mixing several stores, and infinite (epoch-less) streams.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

import numpy as np

from erstore.errors import InvalidInputError


class BatchPlan:
    """Batches (lists of dataset indices) for each epoch.

    Args:
        array, row, length: storage location and token count of each dataset item.
        batch_size: items per batch.
        shuffle: False keeps dataset order (fastest: purely sequential reads).
        seed: the order is a pure function of (seed, epoch).
        block_rows: storage rows per block (default: the store's chunk height).
        buffer_blocks: blocks mixed together in one shuffle window.
        bucket_by_length: sort each shuffle window by length before batching (less padding).
        rank, world_size: this process's share (see module docstring).
        drop_last: drop the last partial batch, and trim instead of pad across ranks.
    """

    def __init__(self, array: np.ndarray, row: np.ndarray, length: np.ndarray, *, batch_size: int,
                 shuffle: bool = False, seed: int = 0, block_rows: int = 1024, buffer_blocks: int = 16,
                 bucket_by_length: bool = False, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise InvalidInputError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if block_rows < 1 or buffer_blocks < 1:
            raise InvalidInputError("block_rows and buffer_blocks must be at least 1")
        self.length = np.asarray(length, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.block_rows, self.buffer_blocks, self.bucket_by_length = block_rows, buffer_blocks, bucket_by_length
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        n = len(self.length)
        # Storage order, then block boundaries where the (array, row // block_rows) changes.
        block_id = np.asarray(row, dtype=np.int64) // block_rows
        self._storage_order = np.lexsort((np.asarray(row), block_id, np.asarray(array)))
        a, b = np.asarray(array)[self._storage_order], block_id[self._storage_order]
        starts = np.flatnonzero(np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]) if n else np.zeros(0, int)
        self._block_starts = np.r_[starts, n].astype(np.int64)
        share = n // world_size if drop_last else -(-n // world_size)
        self.per_rank = share
        self.batches_per_epoch = share // batch_size if drop_last else -(-share // batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that `__iter__` yields (as `DistributedSampler.set_epoch`)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's batches of `epoch`, from batch number `start` on."""
        for batch in self.epoch_batches(epoch)[start:]:
            yield batch.tolist()

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order, windows = self._order(rng)
        mine = self._share(order)
        if self.bucket_by_length and self.shuffle:
            return self._bucketed(mine, windows, rng)
        cut = range(0, len(mine), self.batch_size)
        batches = [mine[i : i + self.batch_size] for i in cut]
        return batches[: self.batches_per_epoch]

    def _order(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The whole epoch's item order and the size (in items) of a typical shuffle window."""
        n = len(self.length)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64), n
        starts = self._block_starts
        blocks = rng.permutation(len(starts) - 1)
        parts = []
        for w in range(0, len(blocks), self.buffer_blocks):
            chosen = blocks[w : w + self.buffer_blocks]
            window = np.concatenate([self._storage_order[starts[b] : starts[b + 1]] for b in chosen])
            parts.append(rng.permutation(window))
        order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        per_window = max(1, -(-n // max(1, -(-(len(starts) - 1) // self.buffer_blocks))))
        return order, per_window

    def _share(self, order: np.ndarray) -> np.ndarray:
        total = self.per_rank * self.world_size
        if total > len(order):  # pad by repeating the start of the order (DistributedSampler)
            reps = -(-total // max(1, len(order)))
            order = np.tile(order, reps)
        order = order[:total]
        return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def _bucketed(self, mine: np.ndarray, window: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Per shuffle window: sort by length, cut batches, shuffle them. Windows keep their order, so
        a window's batches still share its chunks (the Loader reads them together); a global batch
        shuffle would scatter every read group over the whole store."""
        batches: list[np.ndarray] = []
        partial: list[np.ndarray] = []
        step = max(window, self.batch_size)
        for w in range(0, len(mine), step):
            part = mine[w : w + step]
            part = part[np.argsort(-self.length[part], kind="stable")]
            cut = [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
            full = [b for b in cut if len(b) == self.batch_size]
            partial.extend(b for b in cut if len(b) < self.batch_size)
            batches.extend(full[i] for i in rng.permutation(len(full)))
        # Partial batches (window tails) are merged into one trailing batch stream.
        rest = np.concatenate(partial) if partial else np.zeros(0, dtype=np.int64)
        tail = [rest[i : i + self.batch_size] for i in range(0, len(rest), self.batch_size)]
        return (batches + tail)[: self.batches_per_epoch]


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """`rank` and `world_size`, each defaulting to the initialised torch.distributed group's
    (0 and 1 without one). Does not import torch: without it no group can be initialised."""
    if rank is None or world_size is None:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


class Resumable:
    """(epoch, step) bookkeeping of a reader that walks a seeded plan (`self.plan.seed`):
    `state_dict()` / `load_state_dict()` for exact resumption, `set_epoch()`."""

    epoch: int
    step: int
    plan: object
    noun = "reader"  # for messages: "loader", "feed"

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.plan.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if "seed" in state and state["seed"] != self.plan.seed:
            raise InvalidInputError(f"state was saved with seed {state['seed']}, this {self.noun} has "
                                    f"seed {self.plan.seed}; create the {self.noun} with the same seed")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0
