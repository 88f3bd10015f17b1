"""The Loader's background thread: read groups one ahead, lay out runs of batches, queue them.

Consecutive batches are read in groups of about one shuffle window (`buffer_blocks` x
`block_rows` stored rows) with one batched storage read per group, issued one group ahead so
TensorStore fetches and decompresses group g+1 on its own threads while this thread lays out
the batches of group g. A group's layout (every token's source and destination row) is computed
once by `erstore.torchdata.assemble`, then its batches are materialised in runs of up to
`run_batches` batches (and at most `RUN_VALUES` padded values): a constant number of vectorised
calls per group and per run, none per sequence. The queue between thread and consumer holds finished runs.
Not here: the consumer side (loader.py), batch layout (assemble.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from erstore.torchdata import dataset as _dataset
from erstore.torchdata.assemble import Assembler, Cut, Group, GroupRows

# Padded values per run (8 MB of float32). Bounds a run's buffers; larger ones come from fresh
# mmapped memory each time (glibc) and page-faulting it cost more than the copies into it.
RUN_VALUES = 1 << 21
RUN_VALUES_DEVICE = 1 << 23  # on the device path outputs are device memory: no page faults


class Failure:
    def __init__(self, error: BaseException):
        self.error = error


END = object()


class Prepared:
    """A finished run: its batches, the tensors they are views of, and (CUDA) the event after
    which they are complete on the device."""

    def __init__(self, batches: list[dict[str, Any]], bases: list[torch.Tensor], event: Any):
        self.batches, self.bases, self.event = batches, bases, event


class Producer:
    """What the thread runs. It holds no reference to the iterator, so dropping that stops it."""

    def __init__(self, loader: Any, batches: list[np.ndarray]):
        ds = loader.dataset
        self.dataset, self.batches = ds, batches
        self.device = loader.device
        forked = _dataset.forked()
        self.on_device = loader.decode_on_device and not forked  # forked readers decode on the host
        self.codec = None if forked else ds.store.codec
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        collate = loader.collate
        self.pad_token_id = collate.pad_token_id
        self.assembler = Assembler(dataset=ds, codec=self.codec, dtype=collate.dtype, pad_token_id=collate.pad_token_id,
                                   label_pad=collate.label_pad, device=self.device, pin=loader.pin,
                                   on_device=self.on_device)
        self.group_rows = loader.plan.buffer_blocks * loader.plan.block_rows
        self.run_batches = loader.run_batches

    def __call__(self, out: queue.Queue, stop: threading.Event) -> None:
        # One intra-op thread here (OpenMP settings are per thread): the consumer keeps the
        # pool, and small parallel copies on a busy 2-core box cost ~10 ms each, not ~50 us.
        torch.set_num_threads(1)
        try:
            for laid, run in self.runs():
                if stop.is_set():
                    return
                if not _put(out, stop, self._prepare(laid, run)):
                    return
            _put(out, stop, END)
        except BaseException as e:  # re-raised in the consumer with this traceback
            _put(out, stop, Failure(e))

    def runs(self) -> Iterator[tuple[Group, Cut]]:
        """Every run of the epoch, with its read group's layout, in order (reads one group ahead)."""
        groups = read_groups(self.batches, self.dataset.lengths, self.group_rows)
        pending = self._start_read(groups[0]) if groups else None
        for g, group in enumerate(groups):
            items = np.concatenate(group)
            fetched = pending.result() if self.codec is None else list(pending.spans())
            if g + 1 < len(groups):  # TensorStore reads the next group while this one is laid out
                pending = self._start_read(groups[g + 1])
            laid = self.assembler.group(group, self._arrived(fetched, items))
            budget = RUN_VALUES_DEVICE if self.on_device else RUN_VALUES
            for run in laid.runs(self.run_batches, budget // self.dataset.hidden_size):
                yield laid, run

    def _start_read(self, group: list[np.ndarray]) -> Any:
        return self.dataset.start_read(np.concatenate(group))

    def _arrived(self, fetched: Any, items: np.ndarray) -> GroupRows:
        """The group's stored rows, as they arrived from storage (spans of stored parts), or the
        decoded entries of a forked reader."""
        if self.codec is None:
            return GroupRows.decoded(fetched, self.pad_token_id)
        store = self.dataset.store
        params = {slot: store._array(slot).params for slot in {int(s[0]) for s in fetched}}
        return GroupRows(fetched, self.dataset._row[items], self.codec, params, self.pad_token_id)

    def _prepare(self, group: Group, run: Cut) -> Prepared:
        if self.on_device:
            with torch.cuda.stream(self.stream) if self.cuda else _nothing():
                batches, bases = group.device_run(run)
                event = self._record()
            return Prepared(batches, bases, event)
        batches, bases = group.host_run(run)
        if self.device.type == "cpu":
            return Prepared(batches, bases, None)
        with torch.cuda.stream(self.stream) if self.cuda else _nothing():
            moved = {id(t): t.to(self.device, non_blocking=self.cuda) for t in bases}
            event = self._record()
        # Views keep their offsets: each batch tensor is re-cut from the moved flat tensor.
        batches = [{k: _same_view(v, bases, moved) for k, v in b.items()} for b in batches]
        return Prepared(batches, list(moved.values()), event)

    def _record(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _same_view(v: Any, bases: list[torch.Tensor], moved: dict[int, torch.Tensor]) -> Any:
    """`v` (a view of one of `bases`) as the same view of that base's device copy."""
    if not isinstance(v, torch.Tensor):
        return v
    for base in bases:
        if v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
            offset = v.storage_offset() - base.storage_offset()
            return moved[id(base)].view(-1)[offset : offset + v.numel()].view(v.shape)
    raise RuntimeError("batch tensor is not a view of the run's tensors")  # an erstore bug


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
