"""`Loader`: padded batches of a `StoreDataset`, prepared by a background thread while the consumer computes.

The consumer side: the epoch iterator takes finished runs of batches from the producer's queue
(producer.py) and hands them out one batch at a time; on CUDA it makes the consumer's stream
wait for the run's side-stream work and marks the run's tensors as used there. Order comes from
`erstore.shuffle.BatchPlan` (seeded, resumable, block-aware, sharded across ranks).
Not here: reading and layout (producer.py, assemble.py), items (dataset.py).
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from erstore.errors import ErstoreError, InvalidInputError
from erstore.shuffle import BatchPlan, Resumable, rank_and_world
from erstore.torchdata.collate import Collate
from erstore.torchdata.dataset import StoreDataset
from erstore.torchdata.producer import END, Failure, Prepared, Producer


class Loader(Resumable):
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
        prefetch: batches prepared together and ahead: the thread lays out runs of up to
            `max(prefetch, 4)` consecutive batches at once (at most 2M padded values each on the
            host, 8M on the device) and keeps one finished run queued while it prepares the next.
            Storage reads run a further read group (about one shuffle window of stored rows) ahead.
        device: where batches go (default CPU). On CUDA: pinned staging, copies with non_blocking
            on a side stream; batches arrive as device tensors.
        collate: its `pad_token_id`, `label_pad` and `dtype` are used (default `Collate(dtype=
            dataset.dtype)`).
        reuse_buffers: accepted for compatibility; no effect (batches are views of buffers
            allocated per run, freed when the batches are).
        decode_on_device: copy the stored codes (int8 / 4-bit codes, float16 values...) to
            `device` and decode them there with torch (`erstore.torchcodecs`), instead of decoding
            with numpy on the host and copying float32 states. Default: on for CUDA devices
            (thread producer only).
        producer: "thread" (default) prepares batches on a thread of this process; "process"
            in a spawned child process that writes them into shared memory
            (`erstore.torchdata.process`): delivery then does not depend on the consumer leaving
            the GIL free (a training step with much Python), at a one-off start-up of ~1-2 s per
            Loader (the process serves all its epochs). One epoch at a time: a new `iter()`
            ends the previous iterator. A batch stays valid while referenced; kept batches
            only cost fresh memory.

    Batches of one run are views of shared buffers: a batch you keep keeps its run's buffers alive.

    Example:
        with store.loader(batch_size=32, shuffle=True, seed=1) as loader:
            for batch in loader:
                out = tail(batch["hidden_states"], batch["attention_mask"])
    """

    noun = "loader"

    def __init__(self, dataset: StoreDataset | Any, *, batch_size: int = 32, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, bucket_by_length: bool = False,
                 block_rows: int | None = None, buffer_blocks: int = 16, rank: int | None = None,
                 world_size: int | None = None, prefetch: int = 2, device: str | torch.device | None = None,
                 collate: Collate | None = None, reuse_buffers: bool = False,
                 decode_on_device: bool | None = None, producer: str = "thread"):
        if prefetch < 1:
            raise InvalidInputError(f"prefetch must be at least 1, got {prefetch}")
        if producer not in ("thread", "process"):
            raise InvalidInputError(f"producer must be 'thread' or 'process', got {producer!r}")
        self.producer = producer
        self._worker: Any = None
        self.dataset = dataset if isinstance(dataset, StoreDataset) else StoreDataset(dataset)
        rank, world_size = rank_and_world(rank, world_size)
        ds = self.dataset
        self.plan = BatchPlan(ds._array, ds._row, ds.lengths, batch_size=batch_size, shuffle=shuffle,
                              seed=seed, block_rows=block_rows or ds.block_rows,
                              buffer_blocks=buffer_blocks, bucket_by_length=bucket_by_length,
                              rank=rank, world_size=world_size, drop_last=drop_last)
        self.batch_size, self.prefetch = batch_size, prefetch
        self.run_batches = max(prefetch, 4)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pin = self.device.type != "cpu" and torch.accelerator.is_available()
        self.collate = collate or Collate(dtype=ds.dtype)
        self.reuse_buffers = reuse_buffers
        self.decode_on_device = self.device.type == "cuda" if decode_on_device is None else decode_on_device
        if producer == "process":
            if decode_on_device:
                raise InvalidInputError("producer='process' decodes on the host; leave out decode_on_device=True "
                                        "or use producer='thread'")
            self.decode_on_device = False
        self.epoch, self.step = 0, 0
        self._running: weakref.WeakSet[_Epoch] = weakref.WeakSet()

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(self.plan)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        if self.producer == "process":
            from erstore.torchdata.process import Worker

            for running in list(self._running):
                running.close()
            if self._worker is None or not self._worker.alive():
                self._worker = Worker(self)
            epoch: Any = _ProcessEpoch(self, self._worker)
        else:
            epoch = _Epoch(self)
        self._running.add(epoch)
        return epoch

    def close(self) -> None:
        """Stop every running prefetch thread or producer process (also happens when iterators
        and the Loader are garbage collected)."""
        for epoch in list(self._running):
            epoch.close()
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# While a prefetch thread runs, the interpreter offers the GIL to a waiting thread after 0.5 ms
# instead of Python's default 5 ms: a consumer looping in Python then delays each of the
# thread's few GIL round trips per run by at most that, not by 5 ms. Restored when the last
# running epoch ends. Costs a consumer only the switches the thread asks for. Set to None to
# leave the interpreter's setting alone.
SWITCH_INTERVAL: float | None = 0.0005
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


def _lower_switch_interval() -> None:
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            if SWITCH_INTERVAL is not None and _switch_saved > SWITCH_INTERVAL:
                sys.setswitchinterval(SWITCH_INTERVAL)
        _switch_users += 1


def _restore_switch_interval() -> None:
    global _switch_users
    with _switch_lock:
        _switch_users -= 1
        lowered = min(SWITCH_INTERVAL, _switch_saved) if SWITCH_INTERVAL is not None else _switch_saved
        if _switch_users == 0 and sys.getswitchinterval() == lowered:
            sys.setswitchinterval(_switch_saved)  # unless the user changed it meanwhile


def _shutdown(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread is not threading.current_thread():
        thread.join()
    _restore_switch_interval()


class _Epoch:
    """Iterator over one epoch's remaining batches; owns the prefetch thread."""

    def __init__(self, loader: Loader):
        self.loader = loader
        self.epoch, self.start = loader.epoch, loader.step
        batches = loader.plan.epoch_batches(self.epoch)[self.start:]
        self.producer = Producer(loader, batches)
        # One finished run waits here while the thread prepares the next one.
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.producer, args=(self.queue, self.stop),
                                       name="erstore-prefetch", daemon=True)
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        _lower_switch_interval()
        self._finalizer = weakref.finalize(self, _shutdown, self.stop, self.thread)
        self.thread.start()
        self.waited = 0.0  # seconds next() spent blocked on a batch not ready yet

    def __iter__(self) -> _Epoch:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.stop.is_set():
            raise StopIteration
        if not self._ready:
            self._take()
        self.loader.step += 1
        return self._ready.popleft()

    def _take(self) -> None:
        t0 = time.perf_counter()
        while True:
            try:
                item = self.queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    self.close()
                    raise ErstoreError("the erstore prefetch thread died without a result") from None
        self.waited += time.perf_counter() - t0
        if item is END:
            self.close()
            if self.loader.epoch == self.epoch:
                self.loader.epoch, self.loader.step = self.epoch + 1, 0
            raise StopIteration
        if isinstance(item, Failure):
            self.close()
            error = item.error
            if hasattr(error, "add_note"):
                error.add_note("(raised in erstore's prefetch thread while preparing a batch)")
            raise error
        assert isinstance(item, Prepared)
        if item.event is not None:  # make the consumer's stream wait for the side-stream work
            current = torch.cuda.current_stream(self.loader.device)
            current.wait_event(item.event)
            for t in item.bases:
                t.record_stream(current)
        self._ready.extend(item.batches)

    def close(self) -> None:
        """Stop and join the prefetch thread (idempotent)."""
        self._finalizer()


class _ProcessEpoch:
    """Iterator over one epoch's remaining batches, prepared by the Loader's producer process."""

    def __init__(self, loader: Loader, worker: Any):
        self.loader, self.worker = loader, worker
        self.epoch, self.start = loader.epoch, loader.step
        self.token = worker.begin(self.epoch, self.start)
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self.closed = False
        self.waited = 0.0  # seconds next() spent blocked on a batch not ready yet

    def __iter__(self) -> _ProcessEpoch:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.closed:
            raise StopIteration
        worker = self.worker
        worker.release()
        if not self._ready:
            t0 = time.perf_counter()
            try:
                run = worker.take(self.token)
            except BaseException:
                self.close()
                raise
            self.waited += time.perf_counter() - t0
            if isinstance(run, str):  # the end of the epoch
                self.close()
                if self.loader.epoch == self.epoch:
                    self.loader.epoch, self.loader.step = self.epoch + 1, 0
                raise StopIteration
            self._ready.extend(run)
        self.loader.step += 1
        worker.handed += 1
        return self._ready.popleft()

    def close(self) -> None:
        """Stop this epoch in the producer process (idempotent; the process keeps serving the Loader)."""
        if not self.closed:
            self.closed = True
            self._ready.clear()
            self.worker.stop(self.token)
