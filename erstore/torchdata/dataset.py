"""`StoreDataset`: a map-style torch Dataset over one pinned version of a store.

Items use the names transformers models expect: `hidden_states [L, d]` float, `input_ids [L]`,
`key`, `boundary`, plus label fields. The dataset also keeps, per item, what the Loader's batch
assembly needs as arrays (storage location, length, boundary, keys, label columns), so the Loader
never touches items one by one.

It works in `torch.utils.data.DataLoader` with worker processes. TensorStore aborts a forked
child on first use, so a worker that finds itself in a new process reopens the store
(spawn/forkserver) or, if it was forked, reads local stores through `erstore.localread`.
Not here: collation (`collate.py`), prefetching (`loader.py`), tokenisation (erstore.labels).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from erstore.errors import ErstoreError, InvalidInputError, KeyNotFoundError
from erstore.store import Entry, Store

_FORKED = False  # set in children forked after this module was imported (TensorStore unusable)
_INHERITED: list[Any] = []  # parent's TensorStore handles: never touched or freed in a child


def _after_fork_in_child() -> None:
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def forked() -> bool:
    """True in a process forked after erstore.torchdata was imported (TensorStore unusable)."""
    return _FORKED


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
        # A spawned process (the Loader's producer, DataLoader workers) reopens the store with these.
        self.store_options = getattr(store, "options", {}) if isinstance(store, Store) else store_options
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
        self.boundaries = recs["boundary"].astype(np.int64)
        self.hidden_size = self._store.recipe.hidden_size
        self.max_length = self._store.recipe.max_length
        self.block_rows = self._store.codec.rows_per_chunk(self.hidden_size)
        self._key_list: list[str] | None = self.keys
        self._columns: Any = None

    def item_keys(self) -> list[str]:
        """The key of every item, in dataset order (computed once)."""
        if self._key_list is None:
            recs = self.store.index.records[self.positions]
            # join_key for every item at once: both halves big-endian, one hex string, cut in 32s.
            halves = np.empty((len(recs), 2), dtype=">u8")
            halves[:, 0], halves[:, 1] = recs["hi"], recs["lo"]
            text = halves.tobytes().hex()
            self._key_list = [text[i : i + 32] for i in range(0, len(text), 32)]
        return self._key_list

    def label_columns(self) -> Any:
        """The label fields as `erstore.torchdata.collate.LabelColumns` (None without labels), built once."""
        if self.fields is None:
            return None
        if self._columns is None:
            from erstore.torchdata.collate import LabelColumns

            self._columns = LabelColumns(self.fields, self.lengths)
        return self._columns

    # -- process safety -----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # TensorStore handles do not pickle; reopened on first use
        state["_local"] = None
        state["_columns"], state["_key_list"] = None, self.keys  # rebuilt on demand: smaller pickles
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
        """Issue the read of `read_entries(indices)`; the returned object's `.result()` waits.

        In a forked process the read is synchronous and returns decoded entries (`Done`)."""
        positions = self.positions[np.asarray(indices, dtype=np.int64)]
        if _FORKED:
            return Done(self._forked_reader().read_positions(positions))
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


class Done:
    """An already finished read (the synchronous forked-worker path)."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries

    def result(self) -> list[Entry]:
        return self.entries


def _as_fields(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {"labels": value}
