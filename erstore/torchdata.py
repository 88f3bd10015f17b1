"""The bridge to PyTorch: a map-style `StoreDataset`, a picklable `Collate`, and a prefetching `Loader`.

The only erstore module that imports torch's data utilities (`import erstore` does not import
torch). Items and batches use the names transformers models expect:

    item:  hidden_states [L, d] float, input_ids [L], key, boundary, plus label fields
    batch: hidden_states [B, L, d], attention_mask [B, L], input_ids [B, L], keys, labels...

`Loader` reads in one background thread. Consecutive batches are read in groups of about one
shuffle window (`buffer_blocks` x `block_rows` stored rows, ~16 chunks) with one batched storage
read per group, issued one group ahead so TensorStore fetches and decompresses group g+1 on its
own threads while the thread prepares the batches of group g. A block-shuffled window's batches
share its chunks, so a group reads them once as a few long spans (a batch-by-batch read made one
span per chunk per batch: ~18x the TensorStore calls). Each batch is then decoded from the stored
parts, padded, pinned (only when an accelerator exists) and, on CUDA, copied to the device on a
side stream. With `decode_on_device` (default on CUDA) the thread instead copies the stored
codes to the device and decodes and pads them there (`erstore.torchcodecs`), so the host-to-device
copy carries 0.5-2 bytes per value instead of 4. The queue between thread and consumer is
`prefetch` batches deep. Order comes from
`erstore.shuffle.BatchPlan` (seeded, resumable, block-aware, sharded across ranks).

`StoreDataset` also works in `torch.utils.data.DataLoader` with worker processes. TensorStore
aborts a forked child on first use, so a worker that finds itself in a new process reopens the
store (spawn/forkserver) or, if it was forked, reads local stores through `erstore.localread`.
Not here: model code, tokenisation (see erstore.labels), multi-store mixing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from erstore import torchcodecs
from erstore.errors import ErstoreError, InvalidInputError, KeyNotFoundError
from erstore.shuffle import BatchPlan
from erstore.store import Entry, RawEntry, Store

LABEL_PAD = -100
_FORKED = False  # set in children forked after this module was imported (TensorStore unusable)
_INHERITED: list[Any] = []  # parent's TensorStore handles: never touched or freed in a child


def _after_fork_in_child() -> None:
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class StoreDataset(Dataset):
    """Map-style dataset over one pinned version of a store, or over a subset of its keys.

    Args:
        store: an open `Store`, or a store path/URL (opened at `version`).
        keys: which sequences, in order (default: all with labels if `labels` is given, else all).
        labels: key -> label fields (`{"labels": 3}`, or a bare value meaning `{"labels": value}`),
            e.g. from `erstore.labels`, or an `erstore.labels.Examples` list (one item per
            example; several examples may share a stored window). Fields are added to each item.
        dtype: torch dtype of `hidden_states` items (decoded from the stored dtype).
    Raises KeyNotFoundError if a key is not in the store version.
    """

    def __init__(self, store: Store | str | os.PathLike[str], *, keys: Sequence[str] | None = None,
                 labels: Mapping[str, Any] | None = None, version: int | None = None,
                 dtype: torch.dtype = torch.float32, **store_options: Any):
        self._store: Store | None = store if isinstance(store, Store) else Store(store, version=version, **store_options)
        self.url = self._store.location.url
        self.version = self._store.version
        self.store_options = store_options
        self.dtype = dtype
        self._pid = os.getpid()
        self._local: Any = None
        examples = getattr(labels, "keys_and_fields", None)
        if callable(examples):  # erstore.labels.Examples: one item per example, keys may repeat
            if keys is not None:
                raise InvalidInputError("labels= is a list of examples, which names its own keys; "
                                        "leave out keys= (or select examples before passing them)")
            keys, labels = examples()
            labels = dict(enumerate(labels))  # looked up by item index below
        elif keys is None and labels is not None:
            keys = list(labels)
        if keys is None:
            self.positions = np.arange(len(self._store), dtype=np.int64)
            self.keys: list[str] | None = None
        else:
            self.keys = list(keys)
            self.positions = self._store.index.find(self.keys)
            missing = [k for k, p in zip(self.keys, self.positions) if p < 0]
            if missing:
                raise KeyNotFoundError(
                    f"{len(missing)} of {len(self.keys)} keys are not in {self.url} version "
                    f"{self.version}, e.g. {missing[0]}; drop them or open a version that has them"
                )
        self.fields: list[dict[str, Any]] | None = None
        if labels is not None:
            keys_ = self.keys or list(self._store)
            try:
                self.fields = ([_as_fields(labels[i]) for i in range(len(keys_))] if callable(examples)
                               else [_as_fields(labels[k]) for k in keys_])
            except KeyError as e:
                raise KeyNotFoundError(f"key {e.args[0]} has no entry in `labels`; pass keys= with "
                                       "only labelled keys, or label every key") from e
        recs = self._store.index.records[self.positions]
        self.lengths = recs["length"].astype(np.int64)
        self._array, self._row = recs["array"].astype(np.int64), recs["row"].astype(np.int64)
        self.hidden_size = self._store.recipe.hidden_size
        self.max_length = self._store.recipe.max_length
        self.block_rows = self._store.codec.rows_per_chunk(self.hidden_size)

    # -- process safety -----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # TensorStore handles do not pickle; reopened on first use
        state["_local"] = None
        return state

    @property
    def store(self) -> Store:
        """The store, reopened at the same version if this is a new (spawned) process."""
        if self._store is None or self._pid != os.getpid():
            if self._store is not None:
                _INHERITED.append(self._store)  # a forked copy: freeing it would touch TensorStore
            self._store = Store(self.url, version=self.version, **self.store_options)
            self._pid = os.getpid()
        return self._store

    def read_entries(self, indices: Sequence[int]) -> list[Entry]:
        """Entries (stored dtype, numpy) of dataset items `indices`, with one batched storage read."""
        return self.start_read(indices).result()

    def start_read(self, indices: Sequence[int]) -> Any:
        """Issue the read of `read_entries(indices)`; the returned object's `.result()` waits."""
        positions = self.positions[np.asarray(indices, dtype=np.int64)]
        if _FORKED:
            return _Done(self._forked_reader().read_positions(positions))
        return self.store.start_read(positions)

    def _forked_reader(self) -> Any:
        if self._local is None:
            store = self._store
            if store is None or not store.location.is_local:
                raise ErstoreError(
                    f"{self.url} cannot be read in a forked process (TensorStore aborts after "
                    "fork) and is not a local folder; use DataLoader(..., "
                    "multiprocessing_context='spawn') or erstore's Loader (a thread)"
                )
            from erstore.localread import LocalReader

            _INHERITED.append(store)
            self._local = LocalReader(store.location.spec["path"], store.index, store.codec,
                                      store.recipe.hidden_size)
        return self._local

    # -- Dataset protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Items of `indices`, read in one batch (DataLoader calls this with a whole batch)."""
        n = len(self)
        idx = [int(i) for i in indices]
        if any(not -n <= i < n for i in idx):
            raise IndexError(f"index out of range for a dataset of {n} sequences")
        idx = [i % n if n else i for i in idx]
        entries = self.read_entries(idx)
        items = []
        for i, e in zip(idx, entries):
            item = {"hidden_states": torch.from_numpy(np.array(e.states, dtype=np.float32)).to(self.dtype),
                     "input_ids": torch.from_numpy(np.array(e.token_ids, dtype=np.int64)),
                     "key": e.key, "boundary": e.boundary}
            if self.fields is not None:
                item.update(self.fields[i])
            items.append(item)
        return items


class _Done:
    """An already finished read (the synchronous forked-worker path)."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries

    def result(self) -> list[Entry]:
        return self.entries


def _as_fields(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {"labels": value}


class Collate:
    """Pad items to the longest in the batch (picklable: usable as a DataLoader collate_fn).

    Per-token fields (1-D values as long as the item) are padded with `label_pad`; scalars become
    a tensor [B]; strings and other objects become lists. `keys` holds the items' keys.
    """

    def __init__(self, *, pad_token_id: int = 0, label_pad: int = LABEL_PAD,
                 dtype: torch.dtype = torch.float32):
        self.pad_token_id, self.label_pad, self.dtype = pad_token_id, label_pad, dtype

    def __call__(self, items: Sequence[Mapping[str, Any]], out: _Buffers | None = None) -> dict[str, Any]:
        if not items:
            raise InvalidInputError("cannot collate an empty batch")
        lengths = [len(it["input_ids"]) for it in items]
        b, width = len(items), max(lengths)
        parts = [_tensor(it["hidden_states"]) for it in items]
        d = int(parts[0].shape[-1])
        if out is None:
            out = _Buffers(b, width, d, self.dtype)
        padded, mask, ids = out.views(b, width)
        batch = self.frame(items, mask=mask, ids=ids)
        # Per item, one casting copy of its tokens and one zeroing of its padding, so each byte
        # of the batch is written once (torch casts fp16/bf16 fast, numpy does not).
        for row, part, n in zip(padded.unbind(0), parts, lengths):
            row[:n].copy_(part)
            row[n:].zero_()
        return {"hidden_states": padded, **batch}

    def frame(self, items: Sequence[Mapping[str, Any]], *, mask: torch.Tensor | None = None,
              ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Everything of the batch but `hidden_states`: mask, padded ids, keys, boundaries, labels.

        `mask` / `ids` are [B, L] long tensors to fill (default: new ones).
        """
        lengths = [len(it["input_ids"]) for it in items]
        b, width = len(items), max(lengths)
        mask = torch.empty(b, width, dtype=torch.long) if mask is None else mask
        ids = torch.empty(b, width, dtype=torch.long) if ids is None else ids
        mask.copy_(torch.arange(width)[None, :] < torch.tensor(lengths)[:, None])
        ids.fill_(self.pad_token_id)
        ids.view(-1).index_copy_(0, real_rows(mask), _concat([it["input_ids"] for it in items]).to(torch.long))
        batch: dict[str, Any] = {"attention_mask": mask, "input_ids": ids, "keys": [it["key"] for it in items]}
        if "boundary" in items[0]:
            batch["boundaries"] = torch.tensor([int(it["boundary"]) for it in items], dtype=torch.long)
        for name in items[0]:
            if name not in ("hidden_states", "input_ids", "key", "boundary"):
                batch[name] = self._field([it.get(name) for it in items], lengths, width)
        return batch

    def _field(self, values: list[Any], lengths: list[int], width: int) -> Any:
        first = values[0]
        if isinstance(first, (str, bytes)) or first is None:
            return values
        arrays = [np.asarray(v) for v in values]
        if all(a.ndim == 1 and len(a) == n for a, n in zip(arrays, lengths)) and arrays[0].dtype.kind in "iuf":
            out = np.full((len(values), width), self.label_pad, dtype=np.result_type(*arrays))
            for i, (a, n) in enumerate(zip(arrays, lengths)):
                out[i, :n] = a
            return torch.from_numpy(out)
        try:
            return torch.from_numpy(np.stack(arrays))
        except (ValueError, TypeError):
            return values


def real_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the real (unpadded) token positions of a [B, L] mask, in row order."""
    return mask.view(-1).nonzero().squeeze(1)


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torchcodecs.as_tensor(value)


def _concat(values: list[Any]) -> torch.Tensor:
    """Row-concatenation of numpy arrays or tensors, as one tensor."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values)
    return torchcodecs.as_tensor(np.concatenate([np.asarray(v) for v in values]))


class _Buffers:
    """Flat batch buffers viewed as contiguous [B, L, d] / [B, L] tensors of any B, L that fit."""

    def __init__(self, batch_size: int, max_length: int, d: int, dtype: torch.dtype, *, pin: bool = False):
        self.capacity, self.d = batch_size * max_length, d
        self.states = torch.empty(self.capacity * d, dtype=dtype, pin_memory=pin)
        self.mask = torch.empty(self.capacity, dtype=torch.long, pin_memory=pin)
        self.ids = torch.empty(self.capacity, dtype=torch.long, pin_memory=pin)
        self.event: Any = None  # CUDA event of the last copy out of this buffer

    def views(self, b: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if b * width > self.capacity:
            raise InvalidInputError(f"a batch of {b} x {width} tokens does not fit the loader's buffers")
        n = b * width
        return (self.states[: n * self.d].view(b, width, self.d), self.mask[:n].view(b, width),
                self.ids[:n].view(b, width))


class Loader:
    """Batches of a `StoreDataset`, prepared by a background thread while the consumer computes.

    Iterating yields the rest of the current epoch (from `step`), then moves to the next epoch.
    `state_dict()` / `load_state_dict()` save and restore (epoch, step) for exact resumption.
    The epoch iterator's `waited` counts the seconds `next()` spent blocked on a batch that was
    not ready yet (0 when the loader keeps ahead of the consumer).

    Args:
        dataset: a `StoreDataset` (or a `Store`, wrapped in one).
        batch_size, shuffle, seed, drop_last, bucket_by_length, block_rows, buffer_blocks:
            see `erstore.shuffle.BatchPlan`.
        rank, world_size: this process's share (default: from torch.distributed if initialised).
        prefetch: batches prepared ahead (queue depth). Storage reads run a further read group
            (about one shuffle window of stored rows) ahead of the batches being prepared.
        device: where batches go (default CPU). On CUDA: pinned staging buffers, copy with
            non_blocking on a side stream; batches arrive as device tensors.
        reuse_buffers: on CPU, hand out preallocated buffers that are overwritten `prefetch + 1`
            batches later (faster, but keep `.clone()`s of what you store). Default: False.
        decode_on_device: copy the stored codes (int8 / 4-bit codes, float16 values...) to
            `device` and decode them there with torch (`erstore.torchcodecs`), instead of decoding
            with numpy on the host and copying float32 states. Default: on for CUDA devices.

    Example:
        with store.loader(batch_size=32, shuffle=True, seed=1) as loader:
            for batch in loader:
                out = tail(batch["hidden_states"], batch["attention_mask"])
    """

    def __init__(self, dataset: StoreDataset | Store, *, batch_size: int = 32, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, bucket_by_length: bool = False,
                 block_rows: int | None = None, buffer_blocks: int = 16, rank: int | None = None,
                 world_size: int | None = None, prefetch: int = 2, device: str | torch.device | None = None,
                 collate: Collate | None = None, reuse_buffers: bool = False,
                 decode_on_device: bool | None = None):
        if prefetch < 1:
            raise InvalidInputError(f"prefetch must be at least 1, got {prefetch}")
        self.dataset = dataset if isinstance(dataset, StoreDataset) else StoreDataset(dataset)
        if world_size is None or rank is None:
            dist_rank, dist_world = _distributed()
            rank = dist_rank if rank is None else rank
            world_size = dist_world if world_size is None else world_size
        ds = self.dataset
        self.plan = BatchPlan(ds._array, ds._row, ds.lengths, batch_size=batch_size, shuffle=shuffle,
                              seed=seed, block_rows=block_rows or ds.block_rows,
                              buffer_blocks=buffer_blocks, bucket_by_length=bucket_by_length,
                              rank=rank, world_size=world_size, drop_last=drop_last)
        self.batch_size, self.prefetch = batch_size, prefetch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pin = self.device.type != "cpu" and torch.accelerator.is_available()
        self.collate = collate or Collate(dtype=ds.dtype)
        self.reuse_buffers = reuse_buffers or self.device.type != "cpu"
        self.decode_on_device = self.device.type == "cuda" if decode_on_device is None else decode_on_device
        self.epoch, self.step = 0, 0
        self._running: weakref.WeakSet[_Epoch] = weakref.WeakSet()

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(self.plan)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.plan.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if "seed" in state and state["seed"] != self.plan.seed:
            raise InvalidInputError(f"state was saved with seed {state['seed']}, this loader has "
                                    f"seed {self.plan.seed}; create the loader with the same seed")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        epoch = _Epoch(self)
        self._running.add(epoch)
        return epoch

    def close(self) -> None:
        """Stop every running prefetch thread (also happens when iterators are garbage collected)."""
        for epoch in list(self._running):
            epoch.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class _Producer:
    """What the thread runs. It holds no reference to the iterator, so dropping that stops it."""

    def __init__(self, loader: Loader, batches: list[np.ndarray]):
        self.dataset, self.collate, self.batches = loader.dataset, loader.collate, batches
        self.device, self.pin = loader.device, loader.pin
        self.on_device = loader.decode_on_device and not _FORKED  # forked readers decode on the host
        d, width = loader.dataset.hidden_size, loader.dataset.max_length
        # Host staging buffers only for host-side collation: decoding on the device pads there.
        count = loader.prefetch + 2 if loader.reuse_buffers and not self.on_device else 0
        self.pooled = count > 0
        self.free: queue.Queue[_Buffers] = queue.Queue()
        for _ in range(count):
            self.free.put(_Buffers(loader.batch_size, width, d, loader.dataset.dtype, pin=self.pin))
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        # Reads return stored parts, decoded batch by batch (not a whole group at once, which
        # would stall the queue); forked readers return decoded entries.
        self.codec = None if _FORKED else loader.dataset.store.codec
        self.group_rows = loader.plan.buffer_blocks * loader.plan.block_rows

    def __call__(self, out: queue.Queue, stop: threading.Event) -> None:
        # One intra-op thread here (OpenMP settings are per thread): the consumer keeps the
        # pool, and small parallel copies on a busy 2-core box cost ~10 ms each, not ~50 us.
        torch.set_num_threads(1)
        try:
            # One read group of look-ahead: TensorStore fetches and decodes group g+1 on its own
            # threads while this thread pads and copies the batches of group g.
            groups = read_groups(self.batches, self.dataset.lengths, self.group_rows)
            pending = self._start_read(groups[0]) if groups else None
            for g, group in enumerate(groups):
                fetched = pending.result() if self.codec is None else pending.raw_result()
                if g + 1 < len(groups):
                    pending = self._start_read(groups[g + 1])
                at = 0
                for idx in group:
                    if stop.is_set():
                        return
                    entries, at = fetched[at : at + len(idx)], at + len(idx)
                    if not _put(out, stop, self._batch(entries, idx, stop)):
                        return
            _put(out, stop, (_END, None))
        except BaseException as e:  # re-raised in the consumer with this traceback
            _put(out, stop, (_Failure(e), None))

    def _start_read(self, group: list[np.ndarray]) -> Any:
        return self.dataset.start_read(np.concatenate(group))

    def _batch(self, entries: list[Any], idx: np.ndarray, stop: threading.Event) -> tuple[Any, _Buffers | None]:
        """The batch of `entries` (raw ones when decoding on the device) and the buffer it uses."""
        if self.on_device:
            return self._decode_on_device(entries, idx), None
        buf = self._take(stop)
        states = [e.states for e in entries] if self.codec is None else self._decode_on_host(entries)
        batch = self.collate(self._items(entries, idx, states=states), out=buf)
        return self._to_device(batch, buf), buf

    def _items(self, entries: Sequence[Any], idx: np.ndarray, *, states: Sequence[Any] | None) -> list[dict[str, Any]]:
        items = [{"input_ids": e.token_ids, "key": e.key, "boundary": e.boundary} for e in entries]
        if states is not None:
            for item, s in zip(items, states):
                item["hidden_states"] = s
        if self.dataset.fields is not None:
            for item, i in zip(items, idx.tolist()):
                item.update(self.dataset.fields[i])
        return items

    def _decode_on_host(self, raw: list[RawEntry]) -> list[torch.Tensor]:
        """Each entry's states (views of its build's decoded rows), with one codec call per build."""
        rows: list[Any] = [None] * len(raw)
        for members, parts, params in _builds(raw):
            decoded = torchcodecs.as_tensor(self.codec.decode(parts, params))
            for i, part in zip(members, decoded.split([len(raw[i].token_ids) for i in members])):
                rows[i] = part
        return rows

    def _decode_on_device(self, raw: list[RawEntry], idx: np.ndarray) -> dict[str, Any]:
        """The batch of `raw` entries, their stored parts copied to the device and decoded there."""
        batch = self.collate.frame(self._items(raw, idx, states=None))
        b, width = batch["attention_mask"].shape
        rows = real_rows(batch["attention_mask"]).numpy()
        offsets = np.cumsum([0] + [len(e.token_ids) for e in raw])
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            moved = {k: v.to(self.device, non_blocking=self.pin) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            states = torch.zeros(b * width, self.dataset.hidden_size, dtype=self.dataset.dtype, device=self.device)
            for members, parts, params in _builds(raw):
                where = rows[np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in members])]
                decoded = torchcodecs.decode(self.codec, {name: self._host_to_device(p) for name, p in parts.items()},
                                             params)
                states.index_copy_(0, self._host_to_device(where), decoded.to(states.dtype))
            moved["hidden_states"] = states.view(b, width, -1)
            if self.cuda:
                moved["_event"] = torch.cuda.Event()
                moved["_event"].record(self.stream)
        return moved

    def _host_to_device(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torchcodecs.as_tensor(x) if isinstance(x, np.ndarray) else x
        if self.pin:
            t = t.pin_memory()  # from torch's caching host allocator; the copy below is async
        return t.to(self.device, non_blocking=self.pin)

    def _take(self, stop: threading.Event) -> _Buffers | None:
        if not self.pooled:
            return None  # the collate allocates fresh tensors
        while not stop.is_set():
            try:
                buf = self.free.get(timeout=0.1)
            except queue.Empty:
                continue
            if buf.event is not None:
                buf.event.synchronize()  # the device copy out of it has finished
            return buf
        return None

    def _to_device(self, batch: dict[str, Any], buf: _Buffers | None) -> dict[str, Any]:
        if self.device.type == "cpu":
            return batch
        moved = dict(batch)
        if self.cuda:
            with torch.cuda.stream(self.stream):
                for k, v in batch.items():
                    if isinstance(v, torch.Tensor):
                        moved[k] = v.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            moved["_event"] = event
            if buf is not None:
                buf.event = event
                self.free.put(buf)  # reusable once `event` completes (checked in _take)
        else:
            for k, v in batch.items():
                if isinstance(v, torch.Tensor):
                    moved[k] = v.to(self.device)
            if buf is not None:
                self.free.put(buf)
        return moved


def _builds(raw: list[RawEntry]) -> list[tuple[list[int], dict[str, np.ndarray], dict[str, Any]]]:
    """Per build among `raw` (sequences of one build share codec parameters, so decode together):
    the indices of its entries, their stored parts concatenated in that order, and its parameters."""
    members: dict[int, list[int]] = {}
    for i, e in enumerate(raw):
        members.setdefault(id(e.params), []).append(i)
    return [(m, {name: np.concatenate([raw[i].parts[name] for i in m]) for name in raw[m[0]].parts},
             raw[m[0]].params) for m in members.values()]


def read_groups(batches: Sequence[np.ndarray], lengths: np.ndarray, rows: int) -> list[list[np.ndarray]]:
    """Consecutive batches cut into groups of about `rows` stored rows, each read with one call.

    One storage read per group instead of one per batch: a block-shuffled batch touches a dozen
    chunks that its neighbours in the same shuffle window touch too, so reading the window's
    sequences together fetches each chunk once and merges neighbours into a few long spans.
    """
    groups: list[list[np.ndarray]] = []
    total = 0
    for idx in batches:
        size = int(lengths[idx].sum())
        if not groups or total + size > rows:
            groups.append([])
            total = 0
        groups[-1].append(idx)
        total += size
    return groups


def _put(out: queue.Queue, stop: threading.Event, item: Any) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _shutdown(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread is not threading.current_thread():
        thread.join()


class _Epoch:
    """Iterator over one epoch's remaining batches; owns the prefetch thread."""

    def __init__(self, loader: Loader):
        self.loader = loader
        self.epoch, self.start = loader.epoch, loader.step
        batches = loader.plan.epoch_batches(self.epoch)[self.start:]
        self.producer = _Producer(loader, batches)
        self.queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.producer, args=(self.queue, self.stop),
                                       name="erstore-prefetch", daemon=True)
        self._held: _Buffers | None = None
        self._finalizer = weakref.finalize(self, _shutdown, self.stop, self.thread)
        self.thread.start()
        self.waited = 0.0  # seconds next() spent blocked on a batch not ready yet

    def __iter__(self) -> _Epoch:
        return self

    def __next__(self) -> dict[str, Any]:
        import time

        if self._held is not None and self.loader.device.type == "cpu":
            self.producer.free.put(self._held)  # the consumer moved on from the previous batch
        self._held = None
        if self.stop.is_set():
            raise StopIteration
        t0 = time.perf_counter()
        while True:
            try:
                item, buf = self.queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    self.close()
                    raise ErstoreError("the erstore prefetch thread died without a result") from None
        self.waited += time.perf_counter() - t0
        if item is _END:
            self.close()
            if self.loader.epoch == self.epoch:
                self.loader.epoch, self.loader.step = self.epoch + 1, 0
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            error = item.error
            if hasattr(error, "add_note"):
                error.add_note("(raised in erstore's prefetch thread while preparing a batch)")
            raise error
        self._held = buf
        event = item.pop("_event", None)
        if event is not None:  # make the consumer's stream wait for the side-stream copy
            current = torch.cuda.current_stream(self.loader.device)
            current.wait_event(event)
            for v in item.values():
                if isinstance(v, torch.Tensor):
                    v.record_stream(current)
        self.loader.step += 1
        return item

    def close(self) -> None:
        """Stop and join the prefetch thread (idempotent)."""
        self._finalizer()
