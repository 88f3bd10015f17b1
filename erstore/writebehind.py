"""Writing computed batches on a background thread, so that the forward pass does not wait.

The builder hands each batch's states to `WriteBehind.put`; one named thread appends them to
the layer writers (encode, checksum, TensorStore writes, journals) while the main thread runs
the next forward pass (torch and TensorStore release the GIL for their work). The queue holds
`depth` batches, which bounds memory; `wait_s` is the time the forward pass spent blocked on a
full queue - the cost of writing that did not overlap compute.

The writers are touched only by this thread between the first `put` and `close`; the builder
may meanwhile call `StoreWriter.stored` and `add_document`, which do not share state with
appending. An error in the thread is raised in the main thread at the next `put` or at `close`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

_DONE = object()


class WriteBehind:
    """A bounded queue of computed batches and the thread that appends them."""

    def __init__(self, writers: dict[int, Any], *, depth: int = 2):
        self.writers = writers
        self.wait_s = 0.0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="erstore-write-behind", daemon=True)
        self._thread.start()

    def put(self, batch: list, arrays: dict[int, np.ndarray]) -> None:
        """Queue one batch: rows (key, ids, boundary, layers) and {layer: states [B, L, d]}."""
        self._raise()
        t0 = time.perf_counter()
        self._queue.put((batch, arrays))
        self.wait_s += time.perf_counter() - t0

    def mark(self, documents: int, digest: str, docs_bytes: dict[int, int]) -> None:
        """Queue a resume point after the batches queued so far (`StoreWriter.mark_input`)."""
        self._raise()
        self._queue.put((None, (documents, digest, docs_bytes)))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is not None:
                continue  # keep draining so that a blocked `put` returns and sees the error
            batch, arrays = item
            try:
                if batch is None:
                    documents, digest, docs_bytes = arrays
                    for k, w in self.writers.items():
                        w.mark_input(documents, digest, docs_bytes[k])
                    continue
                for row, (key, tok, boundary, need, *_) in enumerate(batch):
                    for k in need:
                        self.writers[k].append(key, arrays[k][row], tok, boundary=boundary)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self, *, raise_error: bool = True) -> None:
        """Wait until every queued batch is appended; raise the thread's error if any."""
        if not self._closed:
            self._closed = True
            t0 = time.perf_counter()
            self._queue.put(_DONE)
            self._thread.join()
            self.wait_s += time.perf_counter() - t0
        if raise_error:
            self._raise()
