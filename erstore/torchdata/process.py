"""The Loader's producer process: runs of batches laid out in shared-memory slots, outside the consumer's GIL.

With `Loader(..., producer="process")` a spawned child process does what the prefetch thread
does (storage reads, decoding, layout: producer.py and assemble.py, the same code, so the same
bits) and writes each run of batches into a *slot*, a block of shared memory the consumer maps
once. Per run the consumer receives one small message (slot number, offsets, shapes, keys) and
cuts its batches as views of the slot: none of the producer's Python work competes for the
consumer's GIL, and no batch bytes are copied between the processes.

Slots: the child allocates them (torch shared memory with the file-descriptor strategy: the
segment is unlinked at once, so nothing is left in /dev/shm even if a process is killed) and
sends each to the consumer once; at most SLOTS are in use. A batch stays valid while you hold
it: when the consumer asks for a batch, the runs handed out before the previous batch are
checked (storage use count); a slot nobody references goes back to the child, one the user
still references (kept batches) is left to the user's tensors and the child allocates another.
Keeping batches is correct, it only costs fresh memory.
On CUDA the consumer pins each slot (cudaHostRegister), copies each run's used bytes to the
device with one non-blocking copy on a side stream, and returns the slot once that copy is done;
batches are device tensors. Host decoding only (the child cannot launch the consumer's kernels).

Lifecycle: the process starts with a Loader's first epoch and serves all its epochs (start-up,
~1-2 s for importing torch and opening the store, is paid once); it ends with `Loader.close()`,
garbage collection of the Loader, interpreter exit, or when the consumer dies (its pipe closes).
It ignores SIGINT: Ctrl-C goes to the consumer, whose exit closes it. Errors raised in the child
(e.g. CorruptStoreError) are re-raised in the consumer as the same exception, with the child's
traceback as a note. Spawned like DataLoader's spawn workers: a script needs the usual
`if __name__ == "__main__":` guard.
Not here: the layout of batches (assemble.py), the thread producer (producer.py).
"""

from __future__ import annotations

import collections
import pickle
import signal
import traceback
import weakref
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as tmp

from erstore.errors import ErstoreError
from erstore.torchdata.producer import Producer

SLOTS = 4  # one being filled, one or two queued, one being handed out (plus the one just before)
ALIGN = 64
MIN_SLOT_BYTES = 1 << 20
# Batches per run (and per message): more than the thread's 4, since each run costs a message
# both ways; runs stay within the producer's RUN_VALUES padded values, so wide ones are shorter.
RUN_BATCHES = 16
END = "end"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# -- child side ----------------------------------------------------------------------------------
class _Exit(Exception):
    pass


class _Slot:
    """One shared-memory block in the child: a bump allocator for one run at a time."""

    def __init__(self, ident: int, nbytes: int):
        self.id, self.capacity = ident, _align(nbytes)
        self.tensor = torch.empty(self.capacity, dtype=torch.uint8).share_memory_()
        self.ptr = self.tensor.data_ptr()
        self.used, self.sent = 0, False

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        at = _align(self.used)
        if at + nbytes > self.capacity:  # does not fit: `describe` asks for a larger slot
            return torch.empty(shape, dtype=dtype)
        self.used = at + nbytes
        return self.tensor[at : at + nbytes].view(dtype).view(shape)

    def holds(self, t: torch.Tensor) -> bool:
        return self.ptr <= t.data_ptr() < self.ptr + self.capacity

    def describe(self, batches: list[dict[str, Any]], bases: list[torch.Tensor]) -> list[dict[str, Any]] | None:
        """The run's batches as (byte offset, dtype, shape, stride) in this slot, after copying
        the bases that are not in it yet (mask, ids, labels: views of per-group arrays); None if
        they do not fit."""
        placed: list[tuple[int, int, int]] = []  # (data_ptr, nbytes, offset in the slot)
        for base in bases:
            if base.numel() == 0 or self.holds(base):
                continue
            if not base.is_contiguous():
                raise RuntimeError("run tensor is not contiguous")  # an erstore bug
            nbytes = base.numel() * base.element_size()
            at = _align(self.used)
            if at + nbytes > self.capacity:
                return None
            self.tensor[at : at + nbytes].view(base.dtype).view(base.shape).copy_(base)
            placed.append((base.data_ptr(), nbytes, at))
            self.used = at + nbytes
        return [{k: self._where(v, placed) for k, v in b.items()} for b in batches]

    def _where(self, v: Any, placed: list[tuple[int, int, int]]) -> Any:
        if not isinstance(v, torch.Tensor):
            return ("v", v)
        if v.numel() == 0:
            return ("e", v.dtype, tuple(v.shape))
        p = v.data_ptr()
        if self.holds(v):
            return ("t", p - self.ptr, v.dtype, tuple(v.shape), v.stride())
        for ptr, nbytes, at in placed:
            if ptr <= p < ptr + nbytes:
                return ("t", at + p - ptr, v.dtype, tuple(v.shape), v.stride())
        return ("n", v.numpy())  # a per-batch tensor of its own ("other" label fields): small


class _Child:
    def __init__(self, dataset: Any, plan: Any, options: dict[str, Any], commands: Any, data: Any):
        self.dataset, self.plan, self.commands, self.data = dataset, plan, commands, data
        self.loader = SimpleNamespace(dataset=dataset, device=torch.device("cpu"), decode_on_device=False,
                                      collate=options["collate"], pin=False, plan=plan,
                                      run_batches=options["run_batches"])
        self.pool: dict[int, _Slot] = {}
        self.free: list[int] = []
        self.next_id = 0
        self.token, self.stopped = 0, False
        self.pending: tuple[int, int, int] | None = None

    def loop(self) -> None:
        while True:
            if self.pending is None:
                self._command(block=True)
                continue
            self.token, epoch, start = self.pending
            self.pending, self.stopped = None, False
            try:
                self._epoch(epoch, start)
            except (_Exit, EOFError, OSError):
                raise
            except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
                self.data.send(("fail", self.token, _portable(e)))

    def _command(self, *, block: bool) -> None:
        while block or self.commands.poll():
            block = False
            msg = self.commands.recv()
            kind = msg[0]
            if kind == "free":
                self.free.append(msg[1])
            elif kind == "drop":  # left to the user's tensors in the consumer
                self.pool.pop(msg[1], None)
            elif kind == "epoch":
                self.pending, self.stopped = msg[1:], True
            elif kind == "stop":
                self.stopped = self.stopped or msg[1] == self.token
            elif kind == "exit":
                raise _Exit

    def _epoch(self, epoch: int, start: int) -> None:
        producer = Producer(self.loader, self.plan.epoch_batches(epoch)[start:])
        asm = producer.assembler
        for laid, run in producer.runs():
            self._command(block=False)
            if self.stopped:
                return
            slot = self._acquire(self._need(laid, run, asm))
            if slot is None:
                return
            asm.alloc = slot.alloc
            try:
                batches, bases = laid.host_run(run)
            finally:
                asm.alloc = None
            described = slot.describe(batches, bases)
            if described is None:  # larger than estimated: all of it into a large enough slot
                slot.used = 0
                self.free.append(slot.id)
                slot = self._acquire(sum(_align(b.numel() * b.element_size()) for b in bases) + ALIGN)
                if slot is None:
                    return
                described = slot.describe(batches, bases)
                assert described is not None
            new = None if slot.sent else slot.tensor
            slot.sent = True
            self.data.send(("run", self.token, slot.id, new, described))
        self.data.send((END, self.token))

    @staticmethod
    def _need(laid: Any, run: Any, asm: Any) -> int:
        labels = laid.labels
        rows = run.total * (asm.d * asm.dtype.itemsize + 8 * (2 + len(labels.per_row)))
        items = (run.i1 - run.i0) * 8 * (1 + len(labels.per_item))
        return rows + items + ALIGN * (8 + len(labels.names))

    def _acquire(self, need: int) -> _Slot | None:
        """A free slot of at least `need` bytes (a new one while fewer than SLOTS exist); None if
        the epoch was stopped meanwhile."""
        while True:
            self._command(block=False)
            if self.stopped:
                return None
            for i, ident in enumerate(self.free):
                if self.pool[ident].capacity >= need:
                    slot = self.pool[self.free.pop(i)]
                    slot.used = 0
                    return slot
            if len(self.pool) < SLOTS:
                slot = _Slot(self.next_id, max(2 * need, MIN_SLOT_BYTES))
                self.pool[slot.id] = slot
                self.next_id += 1
                return slot
            if self.free:  # all free slots are too small: retire one to make room
                retired = self.pool.pop(self.free.pop(0))
                if retired.sent:  # the consumer maps it: let it unmap it
                    self.data.send(("retire", retired.id))
                continue
            self._command(block=True)


def _portable(e: BaseException) -> BaseException:
    """`e` with the child's traceback as a note, or an ErstoreError saying what it was if `e`
    does not pickle."""
    text = "".join(traceback.format_exception(e))
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001 (anything that does not survive the trip)
        return ErstoreError(f"{type(e).__name__} in erstore's producer process: {e}\n{text}")
    if hasattr(e, "add_note"):
        e.add_note(f"(raised in erstore's producer process:\n{text})")
    return e


def serve(dataset: Any, plan: Any, options: dict[str, Any], commands: Any, data: Any) -> None:
    """The child process's main function."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    torch.set_num_threads(1)
    try:
        _Child(dataset, plan, options, commands, data).loop()
    except (_Exit, EOFError, OSError):  # asked to exit, or the consumer is gone
        pass


# -- consumer side ---------------------------------------------------------------------------------
def _use_count(t: torch.Tensor) -> int | None:
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(t.untyped_storage()._cdata))


class _Mapped:
    """A slot as the consumer sees it: the shared tensor, its typed views, whether it is pinned."""

    def __init__(self, tensor: torch.Tensor, pin: bool):
        self.tensor = tensor
        self.typed: dict[torch.dtype, torch.Tensor] = {}
        self.pinned = False
        if pin:
            try:
                rc = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
                self.pinned = int(getattr(rc, "value", rc)) == 0  # cudaError (an enum in torch)
            except Exception:  # noqa: BLE001 (unpinned copies still work, synchronously)
                self.pinned = False

    def unpin(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False


def _views(flat: torch.Tensor, typed: dict[torch.dtype, torch.Tensor], described: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for b in described:
        batch = {}
        for name, d in b.items():
            kind = d[0]
            if kind == "v":
                batch[name] = d[1]
            elif kind == "n":
                batch[name] = torch.from_numpy(d[1])
            elif kind == "e":
                batch[name] = torch.empty(d[2], dtype=d[1], device=flat.device)
            else:
                _, at, dtype, shape, stride = d
                view = typed.get(dtype)
                if view is None:
                    view = typed[dtype] = flat.view(dtype)
                batch[name] = view.as_strided(shape, stride, at // dtype.itemsize)
        out.append(batch)
    return out


class Worker:
    """The consumer's handle on its producer process: epochs, runs, and slot bookkeeping."""

    def __init__(self, loader: Any):
        ctx = tmp.get_context("spawn")
        commands_r, self.commands = ctx.Pipe(duplex=False)
        self.data, data_w = ctx.Pipe(duplex=False)
        options = {"collate": loader.collate, "run_batches": max(loader.run_batches, RUN_BATCHES)}
        self.process = ctx.Process(target=serve, args=(loader.dataset, loader.plan, options, commands_r, data_w),
                                   name="erstore-producer", daemon=True)
        self.process.start()
        commands_r.close()
        data_w.close()
        self.device = loader.device
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.slots: dict[int, _Mapped] = {}
        # Slots whose batches are out: (slot, number of its last batch, copy event).
        self.out: collections.deque[list[Any]] = collections.deque()
        self.handed = 0  # batches handed out so far, all epochs (each one's number)
        self.left = 0  # slots left to batches the user kept
        self.token = 0
        self._finalizer = weakref.finalize(self, _stop, self.process, self.commands, self.data, self.slots)

    def begin(self, epoch: int, start: int) -> int:
        """Start an epoch (ending the one before); returns its token."""
        self.token += 1
        self._send(("epoch", self.token, epoch, start))
        return self.token

    def stop(self, token: int) -> None:
        for entry in self.out:
            entry[1] = min(entry[1], self.handed - 1)  # its remaining batches will not be handed out
        if token == self.token and self.alive():
            try:
                self._send(("stop", token))
            except ErstoreError:  # the child is gone already: nothing to stop
                pass

    def alive(self) -> bool:
        return self._finalizer.alive

    def take(self, token: int) -> list[dict[str, Any]] | str:
        """The next run of epoch `token` (its batches), or END; raises what the child raised."""
        while True:
            if not self.data.poll(0.1):
                self.release(waiting=True)
                if not self.process.is_alive():
                    raise ErstoreError(f"erstore's producer process died (exit code {self.process.exitcode}); "
                                       "see its output above")
                continue
            try:
                msg = self.data.recv()
            except (EOFError, OSError) as e:  # the child exited (killed?) without a word, or while
                self.process.join(timeout=1)  # a new slot's descriptor was fetched from it
                raise ErstoreError(f"erstore's producer process died (exit code {self.process.exitcode}); "
                                   "see its output above") from e
            kind = msg[0]
            if kind == "retire":
                retired = self.slots.pop(msg[1], None)
                if retired is not None:
                    retired.unpin()
            elif kind == "run":
                _, tok, ident, tensor, described = msg
                if tensor is not None:
                    self.slots[ident] = _Mapped(tensor, self.cuda)
                if tok != token:  # a stopped epoch's run
                    self._send(("free", ident))
                    continue
                return self._batches(ident, described)
            elif msg[1] == token:
                if kind == END:
                    return END
                raise msg[2]

    def _batches(self, ident: int, described: list[dict[str, Any]]) -> list[dict[str, Any]]:
        slot = self.slots[ident]
        last = self.handed + len(described) - 1
        if not self.cuda:
            self.out.append([ident, last, None])
            return _views(slot.tensor, slot.typed, described)
        ends = [d[1] + int(np.prod(d[3], dtype=np.int64)) * d[2].itemsize for b in described
                for d in b.values() if d[0] == "t"]
        used = _align(max(ends, default=0))
        with torch.cuda.stream(self.stream):
            moved = slot.tensor[:used].to(self.device, non_blocking=slot.pinned)
            event = torch.cuda.Event()
            event.record(self.stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        moved.record_stream(current)
        self.out.append([ident, last, event])
        return _views(moved, {}, described)

    def release(self, *, waiting: bool = False) -> None:
        """Give back the slots whose batches nobody holds (see the module docstring)."""
        while self.out:
            ident, last, event = self.out[0]
            if event is not None:  # CUDA: the slot is free once its copy is done
                if not event.query():
                    if not waiting:
                        return
                    event.synchronize()
            elif last > self.handed - 2:  # the last batch handed out may still be held (a loop variable)
                return
            self.out.popleft()
            slot = self.slots.get(ident)
            if slot is None:
                continue
            if event is None and self._held(slot):
                del self.slots[ident]  # the user's tensors keep its memory alive
                self.left += 1
                self._send(("drop", ident))
            else:
                self._send(("free", ident))

    @staticmethod
    def _held(slot: _Mapped) -> bool:
        count = _use_count(slot.tensor)
        # Ours: the slot tensor, its typed views, and the storage object `_use_count` makes.
        return count is None or count > 2 + len(slot.typed)

    def _send(self, msg: tuple) -> None:
        try:
            self.commands.send(msg)
        except OSError as e:
            self.process.join(timeout=1)
            raise ErstoreError(f"erstore's producer process died (exit code {self.process.exitcode}); "
                               "see its output above") from e

    def close(self) -> None:
        self._finalizer()


def _stop(process: Any, commands: Any, data: Any, slots: dict[int, _Mapped]) -> None:
    try:
        commands.send(("exit",))
    except OSError:
        pass
    commands.close()
    data.close()  # a child blocked writing to us gets EPIPE and exits
    process.join(timeout=5)
    if process.is_alive():
        process.terminate()
        process.join(timeout=2)
    if process.is_alive():
        process.kill()
        process.join()
    if any(slot.pinned for slot in slots.values()):
        torch.cuda.synchronize()  # no copy from a slot may still run when it is unregistered
    for slot in slots.values():
        slot.unpin()
    slots.clear()

