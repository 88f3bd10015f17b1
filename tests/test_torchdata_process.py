"""The Loader's producer process (`Loader(producer="process")`): same batches, resumable, sharded,
errors surface, slots reused or left to kept batches, and nothing left behind (processes, /dev/shm).

Each Loader here spawns one child (~1-2 s: it imports torch), so the tests share loaders where
they can.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import erstore
from erstore.errors import CorruptStoreError, ErstoreError, InvalidInputError
from erstore.torchdata import process
from tests.test_torchdata import codec_stores  # noqa: F401 (a fixture)
from tests.test_verified_reads import flip_chunk_byte
from tests.test_hostile import make_store


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name, v in x.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == y[name].dtype and v.shape == y[name].shape and torch.equal(v, y[name]), name
            else:
                assert v == y[name], name


# tests/test_torchdata.py checks the thread's batches against Collate for every codec; here a
# lossless store decoded to bf16, int8 (per-build parameters) and int4 (decoded batch by batch).
@pytest.mark.parametrize("codec, dtype", [("shuffle", torch.bfloat16), ("int8", torch.float32),
                                          ("int4:group=16", torch.float32)])
def test_process_batches_are_the_thread_batches(codec_stores, codec, dtype):  # noqa: F811
    # Same layout code in the child, so the same bits for every codec (int4 included), with
    # every kind of label field (per item, per token, per batch "other" values, strings).
    store = erstore.open(codec_stores[codec])
    keys = list(store)
    lengths = {k: len(store.get(k)) for k in keys}
    labels = {k: {"labels": i % 3, "tags": np.arange(lengths[k]) % 5, "pair": [i, -i], "name": k[:4]}
              for i, k in enumerate(keys)}
    options = dict(labels=labels, batch_size=5, shuffle=True, seed=3, block_rows=16, buffer_blocks=2, dtype=dtype)
    thread = list(store.loader(**options))
    with store.loader(**options, producer="process") as loader:
        got = list(loader)  # every batch kept: their slots are left to them
        assert_same(thread, got)
        assert all(b["hidden_states"].is_contiguous() for b in got)


def test_slots_are_reused_and_kept_batches_stay_valid(read_store):
    store = erstore.open(read_store)
    options = dict(batch_size=2, shuffle=True, seed=5, prefetch=1)
    with store.loader(**options) as thread_loader:
        want = [list(thread_loader) for _ in range(3)]
    with store.loader(**options, producer="process") as loader:
        left = []
        for epoch in range(3):
            kept = []
            for i, batch in enumerate(loader):
                if epoch == 1 and i % 3 == 0:
                    kept.append((i, batch))
                else:
                    assert_same([want[epoch][i]], [batch])
            if epoch == 1:  # checked after the epoch, when their slots' runs have long moved on
                assert_same([want[1][i] for i, _ in kept], [b for _, b in kept])
            left.append(loader._worker.left)
            assert len(loader._worker.slots) <= process.SLOTS
        # epoch 0 reuses its slots; epoch 1 leaves the kept batches' slots to them; epoch 2 reuses
        assert left[0] == 0 and left[1] > 0 and left[2] == left[1]


class _Pipe:
    """The two pipes of a producer process, in this process: what the child sends is cut into
    batches (and cloned) at once, and its slot given straight back."""

    def __init__(self):
        self.commands: list[tuple] = []
        self.slots: dict[int, torch.Tensor] = {}
        self.batches: list[dict] = []
        self.retired = 0

    def poll(self) -> bool:
        return bool(self.commands)

    def recv(self) -> tuple:
        return self.commands.pop(0)

    def send(self, msg: tuple) -> None:
        if msg[0] == "retire":
            self.retired += 1
            del self.slots[msg[1]]
        elif msg[0] == "run":
            _, _, ident, tensor, described = msg
            if tensor is not None:
                self.slots[ident] = tensor
            for b in process._views(self.slots[ident], {}, described):
                self.batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()})
            self.commands.append(("free", ident))
        elif msg[0] == "fail":
            raise msg[2]


@pytest.mark.parametrize("min_slot", [process.MIN_SLOT_BYTES, 64], ids=["estimated", "too-small-slots"])
def test_child_slots_in_this_process(read_store, monkeypatch, min_slot):
    # The child's side without a process: runs laid out straight into slots (or, when a slot
    # turns out too small, copied into a larger one after retiring a small one) give the
    # thread's batches.
    monkeypatch.setattr(process, "MIN_SLOT_BYTES", min_slot)
    if min_slot == 64:  # every run starts in a slot too small for it; one slot at most
        monkeypatch.setattr(process._Child, "_need", staticmethod(lambda *a: 1))
        monkeypatch.setattr(process, "SLOTS", 1)
    store = erstore.open(read_store)
    labels = {k: {"labels": i % 3, "pair": [i, -i]} for i, k in enumerate(store)}
    options = dict(labels=labels, batch_size=3, shuffle=True, seed=1)
    want = list(store.loader(**options))
    loader = store.loader(**options, producer="process")
    pipe = _Pipe()
    child = process._Child(loader.dataset, loader.plan, {"collate": loader.collate, "run_batches": 2}, pipe, pipe)
    child.token = 1
    child._epoch(0, 0)
    assert_same(want, pipe.batches)
    assert len(child.pool) <= process.SLOTS
    if min_slot == 64:  # slots were retired to make room for larger ones
        assert child.next_id > process.SLOTS and min(s.capacity for s in child.pool.values()) > 64


def test_resume_and_rank_shards_match_the_thread_loader(read_store, monkeypatch):
    from erstore.torchdata import assemble, dataset

    store = erstore.open(read_store)
    options = dict(batch_size=3, shuffle=True, seed=2, rank=1, world_size=2)
    with store.loader(**options) as full:
        want = [k for b in full for k in b["keys"]]

    def not_here(*args, **kwargs):
        raise AssertionError("the consumer's process read or laid out a batch")

    # Reads and layout happen in the child only: nothing of it is left to need this process's
    # GIL, no prefetch thread runs here, and the switch interval is left alone.
    monkeypatch.setattr(dataset.StoreDataset, "start_read", not_here)
    monkeypatch.setattr(assemble.Group, "host_run", not_here)
    interval = sys.getswitchinterval()
    with store.loader(**options, producer="process") as loader:
        it = iter(loader)
        head = [k for _ in range(2) for k in next(it)["keys"]]
        assert sys.getswitchinterval() == interval
        assert not [t for t in threading.enumerate() if t.name == "erstore-prefetch"]
        state = loader.state_dict()
        assert state["step"] == 2
        loader.load_state_dict({"epoch": 0, "step": 0})
        next(iter(loader))  # a new epoch iterator ends the one before, in the same process
        loader.load_state_dict(state)
        rest = [k for b in loader for k in b["keys"]]
        assert loader.state_dict()["epoch"] == 1
        assert next(it, None) is None  # the first iterator was ended
    assert head + rest == want


def test_bad_options_are_refused(read_store):
    store = erstore.open(read_store)
    with pytest.raises(InvalidInputError, match="producer must be"):
        store.loader(producer="processes")
    with pytest.raises(InvalidInputError, match="decodes on the host"):
        store.loader(producer="process", decode_on_device=True)


def test_a_flipped_byte_raises_corrupt_store_error_in_the_consumer(tmp_path):
    path = tmp_path / "s"
    make_store(path)
    flip_chunk_byte(path)
    store = erstore.open(path)
    with pytest.raises(CorruptStoreError, match="erstore verify") as info, \
            store.loader(batch_size=4, producer="process") as loader:
        for _ in loader:
            pass
    assert any("producer process" in note for note in getattr(info.value, "__notes__", []))


def test_a_killed_producer_process_is_an_error_not_a_hang(read_store):
    import signal

    with erstore.open(read_store).loader(batch_size=2, producer="process") as loader:
        it = iter(loader)
        next(it)
        os.kill(loader._worker.process.pid, signal.SIGKILL)
        with pytest.raises(ErstoreError, match="producer process died"):
            for _ in it:  # the runs already sent still arrive, then the error
                pass


SCRIPT = """
import gc, multiprocessing, os, signal, sys
import erstore

def started(loader):
    it = iter(loader)
    next(it)
    print(loader._worker.process.pid, flush=True)
    return it

def main():
    store = erstore.open(sys.argv[1])
    print(os.getpid(), flush=True)
    if sys.argv[2] == "sigint":  # as Ctrl-C in a terminal: the whole process group gets it
        it = started(store.loader(batch_size=2, producer="process"))
        os.killpg(0, signal.SIGINT)
        next(it)
    loader = store.loader(batch_size=2, producer="process")
    it = started(loader)
    loader.close()
    print(len(multiprocessing.active_children()), flush=True)
    loader = store.loader(batch_size=2, producer="process")
    it = started(loader)
    del it, loader
    gc.collect()
    print(len(multiprocessing.active_children()), flush=True)

if __name__ == "__main__":
    main()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="process groups and /dev/shm as on Linux")
@pytest.mark.parametrize("how", ["close-and-gc", "sigint"])
def test_close_gc_and_ctrl_c_leave_no_process_or_shared_memory(read_store, tmp_path, how):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(read_store), how], capture_output=True, text=True,
                          env=env, timeout=120, start_new_session=True)
    pids = [int(x) for x in done.stdout.split()]
    if how == "sigint":
        assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
        parent, children = pids[0], pids[1:]
    else:
        assert done.returncode == 0, done.stderr
        parent, children, left = pids[0], pids[1::2], pids[2::2]
        assert left == [0, 0]  # close() and garbage collection each ended their child at once
    assert len(children) == (1 if how == "sigint" else 2)
    for child in children:
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    # torch names segments torch_<pid>_...; with the file-descriptor strategy they are unlinked at once
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(tuple(f"torch_{p}_" for p in [parent, *children]))]


def test_a_pickled_dataset_reopens_its_store_with_the_same_options(read_store):
    # The producer process (and spawned DataLoader workers) reopen the store from the pickled
    # dataset: same version and the same options as the caller's Store (e.g. its cache pool).
    import pickle

    ds = erstore.open(read_store, cache_bytes=0).dataset()
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._store is None and copy.store_options == {"cache_bytes": 0}
    assert copy.store.options == {"cache_bytes": 0} and copy.store.version == ds.version
