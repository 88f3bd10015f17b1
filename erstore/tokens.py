"""A token-level feed: batches of individual token rows shuffled across a store (probes, SAEs).

    feed = store.tokens(batch_size=4096, seed=0, drop_special=True)
    for batch in feed:                      # the rest of the current epoch
        x = batch.states                    # [4096, d] numpy, the stored dtype (or dtype=)
        batch.token_ids, batch.positions, batch.sequences, batch.keys

Every stored token row of the chosen sequences (all, or `keys`) comes exactly once per epoch,
minus the dropped ones: special tokens ([CLS]/[SEP]/BOS/EOS/PAD as the store's tokenizer lists
them; [UNK] is content and kept), any `drop_ids`, the first `drop_first` positions of every
stored window (attention-sink tokens), and with `drop_overlap` the positions a continuation
window repeats from the previous window. The order is block-aware (`erstore.tokenplan`): chunks
are permuted, a window of `buffer_bytes` of them is copied by TensorStore straight into one
buffer (one copy per run of neighbouring chunks, each chunk decoded once, on TensorStore's
threads, while the previous window is being consumed), and its rows are shuffled in memory. So reading costs about what a sequential scan costs, where
per-token reads (`read_positions` on random tokens) reach only a few percent of it.

Seeded and resumable: the stream is a pure function of (seed, epoch, rank); `batches(epoch,
start=step)` or `load_state_dict` resume at a batch, reading only the window that holds it.
Ranks get disjoint blocks covering every token. Batches are numpy; `batch.torch()` converts.
Not here: sampling with replacement, mixing several stores, or a torch DataLoader wrapper (the
feed is already batched and prefetching; iterate it directly in each rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorstore as ts

from erstore.codecs import storage_dtype
from erstore.errors import CorruptStoreError, InvalidInputError, KeyNotFoundError
from erstore.index import KeyIndex
from erstore.keys import join_key
from erstore.shuffle import Resumable, rank_and_world
from erstore.store import BuildArrays, Store, open_arrays
from erstore.tokenplan import TokenPlan, token_blocks

DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TokenBatch:
    """One batch of token rows: states [n, d] and, per row, its token id, position and sequence.

    `sequences` are positions in the store's index (commit order); `keys` gives their keys.
    `positions` count from the start of the stored window the token belongs to.
    """

    states: np.ndarray
    token_ids: np.ndarray
    positions: np.ndarray
    sequences: np.ndarray
    epoch: int
    step: int
    index: KeyIndex = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def keys(self) -> list[str]:
        """The key of each row's sequence (computed on access: one string per distinct sequence)."""
        unique, inverse = np.unique(self.sequences, return_inverse=True)
        recs = self.index.records[unique]
        table = [join_key(hi, lo) for hi, lo in zip(recs["hi"].tolist(), recs["lo"].tolist())]
        return [table[i] for i in inverse.tolist()]

    def torch(self, device: Any = None) -> dict[str, Any]:
        """The batch as torch tensors: states, input_ids (int64), positions and sequences."""
        import torch

        states = self.states
        if states.dtype == storage_dtype("bfloat16"):  # numpy has no bfloat16: pass the bits
            t = torch.from_numpy(states.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(states)
        out = {"states": t, "input_ids": torch.from_numpy(self.token_ids.astype(np.int64)),
               "positions": torch.from_numpy(self.positions), "sequences": torch.from_numpy(self.sequences)}
        return out if device is None else {k: v.to(device) for k, v in out.items()}


@dataclass
class _Window:
    """A read window: decoded rows of its runs, and the chosen rows in stream order."""

    states: np.ndarray
    rows: np.ndarray
    token_ids: np.ndarray
    positions: np.ndarray
    sequences: np.ndarray


class TokenFeed(Resumable):
    """Batches of `batch_size` token rows of a store version (see the module docstring).

    Args:
        store: an open `Store`.
        keys: restrict to these sequences (default: every sequence of the version).
        batch_size: token rows per batch.
        shuffle: False reads in storage order (sequential; each token still once).
        seed: the order is a pure function of (seed, epoch, rank).
        drop_special: drop the special tokens of the store's tokenizer (loads it; needs
            transformers). `drop_ids` drops these token ids as well (no tokenizer needed).
        drop_first: drop the first `drop_first` positions of every stored window.
        drop_overlap: in windows that continue a document (not its first window), drop the
            positions before the first new token: the leading special tokens and the `stride`
            tokens repeated from the previous window, so each document token comes once
            (loads the tokenizer; single-text stores only).
        drop_last: only full batches; with several ranks, every rank the same number of them
            (otherwise ranks may differ by a batch, and the last batch may be short).
        rank, world_size: this process's share (default: torch.distributed if initialised).
        block_rows: rows per block (default: the store's chunk height, the natural read unit).
        buffer_bytes: decoded bytes per shuffle window (default 256 MiB; up to two are held).
            Bigger windows mix tokens of more distant parts of the store.
        dtype: numpy dtype of `states` (default: as stored, e.g. float16).

    Raises KeyNotFoundError for keys the version lacks and InvalidInputError for bad options.
    """

    noun = "feed"

    def __init__(self, store: Store, keys: Sequence[str] | None = None, *, batch_size: int = 4096,
                 shuffle: bool = True, seed: int = 0, drop_special: bool = False,
                 drop_ids: Sequence[int] = (), drop_first: int = 0, drop_overlap: bool = False,
                 drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None, block_rows: int | None = None,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, dtype: Any = None):
        if drop_first < 0:
            raise InvalidInputError(f"drop_first must be >= 0, got {drop_first}")
        if buffer_bytes < 1 or (block_rows is not None and block_rows < 1):
            raise InvalidInputError("buffer_bytes and block_rows must be positive")
        self.store = store
        recs = store.index.records
        if keys is None:
            seqs = np.arange(len(recs), dtype=np.int64)
        else:
            found = store.index.find(list(keys))
            if (found < 0).any():
                missing = list(keys)[int(np.flatnonzero(found < 0)[0])]
                raise KeyNotFoundError(f"{int((found < 0).sum())} key(s) are not in {store.location.url} "
                                       f"version {store.version}, e.g. {missing}; pass keys of this version")
            seqs = np.unique(found)  # a key given twice still yields its tokens once
        d = store.recipe.hidden_size
        self.block_rows = block_rows or store.codec.rows_per_chunk(d)
        # One pass reads each chunk once: a cache pool would only add a copy per chunk. Blocks
        # smaller than a chunk decode a chunk several times, so they keep the store's cache.
        chunked = self.block_rows % store.codec.rows_per_chunk(d) == 0
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}}) if chunked else None
        self._arrays: dict[int, BuildArrays] = {}
        sel = recs[seqs]
        skip = np.full(len(seqs), drop_first, dtype=np.int64)
        if drop_overlap:
            skip[np.isin(seqs, continuation_windows(store))] = max(drop_first, overlap_rows(store))
        self.blocks = token_blocks(sel["array"], sel["row"], sel["length"], seqs, drop_first=skip,
                                   block_rows=self.block_rows)
        ids = {int(i) for i in drop_ids} | (special_token_ids(store) if drop_special else set())
        self.drop_ids = np.array(sorted(ids), dtype=np.int64)
        counts = self._filtered_counts() if len(self.drop_ids) else self.blocks.rows()
        rank, world_size = rank_and_world(rank, world_size)
        itemsize = storage_dtype(store.codec.dtype).itemsize if getattr(store.codec, "lossless", False) else 4
        buffer_blocks = max(1, buffer_bytes // (self.block_rows * d * itemsize))
        self.plan = TokenPlan(counts, batch_size=batch_size, shuffle=shuffle, seed=seed,
                              buffer_blocks=buffer_blocks, rank=rank, world_size=world_size,
                              drop_last=drop_last)
        self.counts = counts
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.batch_size = batch_size
        self.epoch, self.step = 0, 0

    def close(self) -> None:
        """Drop the feed's own array handles (the store's stay open)."""
        self._arrays.clear()

    def __enter__(self) -> TokenFeed:  # noqa: PYI034 (as Store; typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- iteration --------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(self.plan)

    @property
    def tokens(self) -> int:
        """Tokens this rank visits per epoch (before drop_last trims the last partial batch)."""
        return self.plan.tokens

    def __iter__(self) -> Iterator[TokenBatch]:
        """The rest of the current epoch from `step` (the next epoch once one is finished)."""
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        for batch in self.batches(self.epoch, start=self.step):
            self.step = batch.step + 1
            yield batch

    def batches(self, epoch: int, start: int = 0) -> Iterator[TokenBatch]:
        """This rank's batches of `epoch` from batch number `start` on."""
        first, end = self.plan.span(start)
        windows = self.plan.windows(epoch)
        sizes = np.array([int(self.counts[w].sum()) for w in windows], dtype=np.int64)
        ends = np.cumsum(sizes)
        w = int(np.searchsorted(ends, first, side="right"))
        offset = first - (int(ends[w - 1]) if w else 0)
        pending = self._start(windows[w]) if first < end else None
        step, pos = start, first
        # A batch's rows are gathered as soon as they are chosen, so a batch that straddles two
        # windows holds no reference to the first: at most two windows are ever alive.
        parts: list[tuple[np.ndarray, ...]] = []
        need = self.batch_size
        while pos < end:
            current = self._finish(pending, epoch, w, int(sizes[w]))
            w += 1
            more = w < len(windows) and ends[w - 1] < end
            pending = self._start(windows[w]) if more else None  # read ahead while this one is consumed
            available = len(current.rows)
            while offset < available and pos < end:
                take = min(need, available - offset, end - pos)
                parts.append(self._take(current, offset, offset + take))
                offset, pos, need = offset + take, pos + take, need - take
                if need == 0 or pos == end:
                    yield TokenBatch(*(_cat([p[i] for p in parts]) for i in range(4)), epoch, step, self.store.index)
                    parts, need, step = [], self.batch_size, step + 1
            offset = 0

    def _take(self, win: _Window, a: int, b: int) -> tuple[np.ndarray, ...]:
        """States (one gather, cast if asked), token ids, positions and sequences of stream rows [a, b)."""
        states = win.states[win.rows[a:b]]
        if self.dtype is not None:
            states = states.astype(self.dtype, copy=False)
        return states, win.token_ids[a:b], win.positions[a:b], win.sequences[a:b]

    # -- reading ----------------------------------------------------------------------------
    def _layout(self, block_ids: np.ndarray) -> tuple[list[tuple[int, int, int]], dict[str, np.ndarray]]:
        """Runs to read for these blocks (neighbouring chunks merged), and per chosen row: its
        index in the runs' concatenated rows, its block, sequence and position."""
        b = self.blocks
        ids = np.sort(block_ids)  # storage order, so neighbours merge into one read
        runs: list[list[int]] = []
        run_of_block = np.empty(len(ids), dtype=np.int64)
        for i, blk in enumerate(ids.tolist()):
            slot, lo, hi = int(b.slot[blk]), int(b.lo[blk]), int(b.hi[blk])
            if runs and runs[-1][0] == slot and lo // self.block_rows <= (runs[-1][2] - 1) // self.block_rows + 1:
                runs[-1][2] = max(runs[-1][2], hi)
            else:
                runs.append([slot, lo, hi])
            run_of_block[i] = len(runs) - 1
        run_lo = np.array([r[1] for r in runs], dtype=np.int64)
        run_base = np.cumsum([0] + [r[2] - r[1] for r in runs])[:-1] - run_lo  # buffer row = row + base
        n_pieces = b.first[ids + 1] - b.first[ids]
        piece = np.repeat(b.first[ids], n_pieces) + _ranges(n_pieces)
        piece_block = np.repeat(np.arange(len(ids)), n_pieces)
        sizes = b.p_stop[piece] - b.p_start[piece]
        within = _ranges(sizes)
        row_piece = np.repeat(piece, sizes)
        rows = b.p_start[row_piece] + within + np.repeat(run_base[run_of_block[piece_block]], sizes)
        layout = {"rows": rows, "block": np.repeat(ids[piece_block], sizes),
                  "sequences": b.p_seq[row_piece], "positions": (b.p_pos0[row_piece] + within).astype(np.int32)}
        return [(r[0], r[1], r[2]) for r in runs], layout

    def _array(self, slot: int) -> BuildArrays:
        if self._context is None:
            return self.store._array(slot)
        if slot not in self._arrays:
            s = self.store
            self._arrays[slot] = open_arrays(s.location, s.index.arrays[slot], s.codec, s.recipe.hidden_size,
                                             self._context)
        return self._arrays[slot]

    def _start(self, block_ids: np.ndarray, *, states: bool = True) -> tuple[Any, ...]:
        """Issue the reads of these blocks. Each run is written straight into its slice of one
        window buffer per stored array (`ts.array(..., copy=False)` views of numpy memory): no
        per-run output arrays to allocate and then concatenate, which took about as long as the
        reads themselves (interleaved A/B, docs/tokens.md)."""
        runs, layout = self._layout(block_ids)

        def handles(slot: int) -> dict[str, ts.TensorStore]:
            arrays = self._array(slot)
            return {**(arrays.parts if states else {}), "tokens": arrays.tokens}

        total = sum(hi - lo for _, lo, hi in runs)
        buffers = {name: np.empty((total, *a.shape[1:]), dtype=a.dtype.numpy_dtype)
                   for name, a in handles(runs[0][0]).items()}
        futures, offset = [], 0
        for slot, lo, hi in runs:
            for name, a in handles(slot).items():
                target = ts.array(buffers[name][offset : offset + hi - lo], copy=False, write=True)
                futures.append(target.write(a[lo:hi]))
            offset += hi - lo
        return runs, layout, buffers, futures

    @staticmethod
    def _wait(pending: tuple[Any, ...]) -> dict[str, np.ndarray]:
        for future in pending[3]:
            future.result()
        return pending[2]

    def _finish(self, pending: tuple[Any, ...], epoch: int, window: int, expected: int) -> _Window:
        runs, layout = pending[0], pending[1]
        parts = dict(self._wait(pending))
        token_buf = parts.pop("tokens")
        codec = self.store.codec
        if getattr(codec, "lossless", False):  # no per-build parameters: the whole window at once (a view)
            states = codec.decode(parts, self._array(runs[0][0]).params)
        else:
            decoded, offset = [], 0
            for slot, lo, hi in runs:
                run = {n: p[offset : offset + hi - lo] for n, p in parts.items()}
                decoded.append(codec.decode(run, self._array(slot).params))
                offset += hi - lo
            states = decoded[0] if len(decoded) == 1 else np.concatenate(decoded)
        rows, seqs, pos = layout["rows"], layout["sequences"], layout["positions"]
        if len(self.drop_ids):
            keep = ~np.isin(token_buf[rows], self.drop_ids)
            rows, seqs, pos = rows[keep], seqs[keep], pos[keep]
        if len(rows) != expected:
            raise CorruptStoreError(f"{self.store.location.url}: a read window holds {len(rows)} tokens to "
                                    f"deliver where the plan counted {expected}; run `erstore verify`")
        order = self.plan.row_order(epoch, window, len(rows))
        rows = rows[order]
        return _Window(states, rows, token_buf[rows], pos[order], seqs[order])

    def _filtered_counts(self) -> np.ndarray:
        """Tokens per block once `drop_ids` are left out: reads the token-id arrays once (4 bytes
        per stored token), a window's worth of blocks per batched read."""
        counts = np.zeros(len(self.blocks), dtype=np.int64)
        step = 4096
        for i in range(0, len(self.blocks), step):
            pending = self._start(np.arange(i, min(i + step, len(self.blocks))), states=False)
            token_buf, layout = self._wait(pending)["tokens"], pending[1]
            keep = ~np.isin(token_buf[layout["rows"]], self.drop_ids)
            counts += np.bincount(layout["block"][keep], minlength=len(self.blocks))
        return counts


def _cat(pieces: list[np.ndarray]) -> np.ndarray:
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _ranges(sizes: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..sizes[0]), [0..sizes[1]), ... (vectorised)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def special_token_ids(store: Store) -> set[int]:
    """Ids the store's tokenizer adds or reserves ([CLS], [SEP], BOS, EOS, PAD...), not [UNK]."""
    if store._tokenizer is None:
        from erstore.tokenize import Windower

        store._tokenizer = Windower.from_recipe(store.recipe)
    tokenizer = store._tokenizer.tokenizer
    return set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}


def continuation_windows(store: Store) -> np.ndarray:
    """Index positions of the windows that are not the first window of their document."""
    if store.manifest is None:
        return np.zeros(0, dtype=np.int64)
    if (store.index.records["boundary"] > 0).any():
        raise InvalidInputError("drop_overlap needs a single-text store; text-pair windows repeat their "
                                "first text whole (use drop_first, or key subsets)")
    # The document maps, size-capped and checked against the manifest like every metadata read.
    later = [k for keys in store.documents().values() for k in keys[1:]]
    found = store.index.find(later)
    return np.unique(found[found >= 0])


def overlap_rows(store: Store) -> int:
    """Positions a continuation window starts with that an earlier window already holds: the
    tokenizer's leading special tokens plus the recipe's stride."""
    if store._tokenizer is None:
        from erstore.tokenize import Windower

        store._tokenizer = Windower.from_recipe(store.recipe)
    mask = store._tokenizer.tokenizer("x", return_special_tokens_mask=True)["special_tokens_mask"]
    lead = next((i for i, m in enumerate(mask) if not m), len(mask))
    return lead + store.recipe.stride

