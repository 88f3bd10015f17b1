"""erstore.torchdata and erstore.shuffle on real (tiny-model) stores: contents, order, threads, workers."""

from __future__ import annotations

import gc
import pickle
import shutil
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import erstore
from erstore.errors import ErstoreError
from erstore.shuffle import BatchPlan
from erstore.torchdata import Collate, read_groups


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "erstore-prefetch"]


def check_batch(store: erstore.Store, batch: dict) -> None:
    """Every row equals store.get; padding is zero, masked out, and padded ids are 0."""
    b, width, _ = batch["hidden_states"].shape
    assert batch["attention_mask"].shape == batch["input_ids"].shape == (b, width)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert max(lengths) == width
    for i, key in enumerate(batch["keys"]):
        states, ids = store.get(key, with_token_ids=True)
        n = lengths[i]
        assert n == len(ids)
        assert torch.equal(batch["attention_mask"][i, :n], torch.ones(n, dtype=torch.long))
        np.testing.assert_array_equal(batch["hidden_states"][i, :n].numpy(), states)
        np.testing.assert_array_equal(batch["input_ids"][i, :n].numpy(), ids)
        assert not batch["hidden_states"][i, n:].any() and not batch["input_ids"][i, n:].any()


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


def test_items_equal_store_get(read_store):
    store = erstore.open(read_store)
    ds = store.dataset()
    assert len(ds) == len(store)
    for i, key in enumerate(store):
        item = ds[i]
        states, ids = store.get(key, with_token_ids=True)
        assert item["key"] == key and item["hidden_states"].dtype == torch.float32
        np.testing.assert_array_equal(item["hidden_states"].numpy(), states)
        np.testing.assert_array_equal(item["input_ids"].numpy(), ids)
    subset = list(store)[3:7][::-1]
    assert [it["key"] for it in store.dataset(subset).__getitems__([0, 1, 2, 3])] == subset
    with pytest.raises(KeyError):
        store.dataset(["0" * 32])


def test_collate_pads_to_longest(read_store):
    store = erstore.open(read_store)
    ds = store.dataset(labels={k: i for i, k in enumerate(store)})
    batch = Collate()(ds.__getitems__([0, 1, len(ds) - 1]))
    check_batch(store, batch)
    assert batch["labels"].tolist() == [0, 1, len(ds) - 1]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("window", [{}, {"block_rows": 8, "buffer_blocks": 2}], ids=["one-group", "many-groups"])
def test_loader_delivers_every_sequence_once(read_store, shuffle, reuse, window):
    store = erstore.open(read_store)
    with store.loader(batch_size=5, shuffle=shuffle, seed=7, reuse_buffers=reuse, prefetch=2, **window) as loader:
        seen = []
        for batch in loader:
            check_batch(store, batch)  # checked before the next batch may reuse the buffers
            seen += batch["keys"]
    assert sorted(seen) == sorted(store)
    assert (seen == list(store)) is (not shuffle)


def test_read_groups_keep_order_and_stay_within_budget():
    lengths = np.array([5, 30, 7, 7, 2, 9, 40, 1])
    batches = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([6]), np.array([7])]
    groups = read_groups(batches, lengths, rows=30)
    assert [b.tolist() for g in groups for b in g] == [b.tolist() for b in batches]
    # A group is full when the next batch would pass the budget; a batch over it stands alone.
    assert [[b.tolist() for b in g] for g in groups] == [[[0, 1]], [[2, 3], [4, 5]], [[6]], [[7]]]
    assert read_groups([], lengths, rows=30) == []


def test_loader_reads_storage_once_per_group_not_per_batch(read_store, monkeypatch):
    store = erstore.open(read_store)
    calls = []
    original = erstore.Store.start_read
    monkeypatch.setattr(erstore.Store, "start_read", lambda self, positions, **kw: calls.append(len(positions))
                        or original(self, positions, **kw))
    loader = store.loader(batch_size=2, shuffle=True, seed=1)
    assert len(keys_of(loader)) == len(store)
    assert calls and len(calls) < len(loader) and sum(calls) == len(store)


def test_loader_hands_out_the_dtype_asked_for(read_store):
    store = erstore.open(read_store)
    batch = next(iter(store.loader(batch_size=4, dtype=torch.bfloat16)))
    assert batch["hidden_states"].dtype == torch.bfloat16
    first = store.get(batch["keys"][0])
    n = int(batch["attention_mask"][0].sum())
    assert torch.equal(batch["hidden_states"][0, :n], torch.from_numpy(np.asarray(first, np.float32)).to(torch.bfloat16))


def test_shuffle_is_seeded_resumable_and_changes_per_epoch(read_store):
    store = erstore.open(read_store)
    a = store.loader(batch_size=4, shuffle=True, seed=11)
    first, second = keys_of(a), keys_of(a)  # epochs 0 and 1
    assert first == keys_of(store.loader(batch_size=4, shuffle=True, seed=11))
    assert first != second and sorted(first) == sorted(second)
    assert first != keys_of(store.loader(batch_size=4, shuffle=True, seed=12))

    interrupted = store.loader(batch_size=4, shuffle=True, seed=11)
    head = []
    for step, batch in enumerate(interrupted):
        head += batch["keys"]
        if step == 2:
            break
    state = interrupted.state_dict()
    interrupted.close()
    assert state == {"epoch": 0, "step": 3, "seed": 11}
    resumed = store.loader(batch_size=4, shuffle=True, seed=11)
    resumed.load_state_dict(state)
    assert head + keys_of(resumed) == first
    assert keys_of(resumed) == second  # then it carries on with the next epoch


def test_length_buckets_stay_inside_their_shuffle_window():
    # 64 sequences, blocks of 4 (800 rows), windows of 2 blocks = 8 sequences = 2 batches of 4.
    lengths = np.random.default_rng(0).integers(50, 150, 64)
    plan = BatchPlan(np.zeros(64), np.arange(64) * 200, lengths, batch_size=4, shuffle=True, seed=0,
                     block_rows=800, buffer_blocks=2, bucket_by_length=True)
    batches = list(plan)
    assert sorted(np.concatenate(batches).tolist()) == list(range(64))
    for longer, shorter in zip(batches[0::2], batches[1::2], strict=True):
        # A window's two batches follow each other, cover its two blocks, and split it by length.
        window = np.concatenate([longer, shorter])
        assert len({i // 4 for i in window}) == 2
        assert (lengths[longer].min() >= lengths[shorter].max()) or (lengths[shorter].min() >= lengths[longer].max())


def test_block_shuffle_keeps_neighbours_together():
    # 64 sequences of 100 rows, blocks of 400 rows -> 16 blocks of 4; a window of 2 blocks.
    rows = np.arange(64) * 100
    plan = BatchPlan(np.zeros(64), rows, np.full(64, 100), batch_size=8, shuffle=True, seed=0,
                     block_rows=400, buffer_blocks=2)
    batches = list(plan)
    assert sorted(np.concatenate(batches).tolist()) == list(range(64))
    assert all(len({i // 4 for i in b}) == 2 for b in batches)  # each batch = exactly 2 blocks
    assert [i for b in batches for i in b] != list(range(64))


def test_length_bucketing_cuts_padding(read_store):
    store = erstore.open(read_store)

    def padded(bucket: bool) -> int:
        loader = store.loader(batch_size=4, shuffle=True, seed=3, bucket_by_length=bucket, buffer_blocks=64)
        return sum(b["attention_mask"].numel() for b in loader), sorted(keys_of(loader))

    (plain, keys_a), (bucketed, keys_b) = padded(False), padded(True)
    assert keys_a == keys_b == sorted(store)
    assert bucketed < plain


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_shards_are_disjoint_complete_and_even(read_store, drop_last):
    store = erstore.open(read_store)
    world = 3
    shards = [keys_of(store.loader(batch_size=4, shuffle=True, seed=5, rank=r, world_size=world,
                                   drop_last=drop_last)) for r in range(world)]
    counts = [len(store.loader(batch_size=4, rank=r, world_size=world, drop_last=drop_last)) for r in range(world)]
    assert len(set(counts)) == 1
    everything = [k for s in shards for k in s]
    if drop_last:
        assert len(set(everything)) == len(everything)  # disjoint
        assert len(everything) == (len(store) // world) // 4 * 4 * world
    else:
        assert set(everything) == set(store)  # complete; repeats only to even out the shares
        assert len(everything) == -(-len(store) // world) * world
        assert len(everything) - len(set(everything)) == len(everything) - len(store)


def test_epoch_counts_the_time_spent_blocked_on_data(read_store, monkeypatch):
    store = erstore.open(read_store)
    original = erstore.Store.start_read

    def slow_start_read(self, positions, **kw):
        time.sleep(0.2)  # every read group arrives 0.2 s late
        return original(self, positions, **kw)

    monkeypatch.setattr(erstore.Store, "start_read", slow_start_read)
    with store.loader(batch_size=4) as loader:
        t = time.perf_counter()
        epoch = iter(loader)
        n = sum(1 for _ in epoch)
        elapsed = time.perf_counter() - t
    assert n == len(loader)
    assert 0.2 <= epoch.waited <= elapsed


def test_early_stop_and_garbage_collection_leave_no_thread(read_store):
    store = erstore.open(read_store)
    loader = store.loader(batch_size=2, prefetch=1)
    for _ in loader:
        assert len(prefetch_threads()) == 1
        break
    gc.collect()
    assert prefetch_threads() == []

    it = iter(loader)
    next(it)
    del it
    gc.collect()
    assert prefetch_threads() == []

    with pytest.raises(RuntimeError, match="consumer failed"):
        with store.loader(batch_size=2) as loader2:
            for _ in loader2:
                raise RuntimeError("consumer failed")
    assert prefetch_threads() == []


def test_errors_in_the_prefetch_thread_surface_with_traceback(read_store, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(read_store, broken)
    store = erstore.open(broken)  # arrays open lazily, on the first read (in the thread)
    for meta in broken.glob("arrays/*/states/zarr.json"):
        meta.write_text("{not json")
    loader = store.loader(batch_size=4)
    with pytest.raises(ErstoreError, match="zarr.json.*erstore verify") as info:
        next(iter(loader))
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "__call__" in frames and "start_read" in frames  # the thread's own frames
    gc.collect()
    assert prefetch_threads() == []


def test_dataset_in_dataloader_with_two_forked_workers(read_store):
    store = erstore.open(read_store)
    ds = store.dataset()
    ds[0]  # TensorStore has run in this process: a forked worker must not touch it again
    plan = BatchPlan(ds._array, ds._row, ds.lengths, batch_size=3, shuffle=True, seed=1, block_rows=ds.block_rows)
    loader = DataLoader(ds, batch_sampler=plan, num_workers=2, collate_fn=Collate())
    assert loader.multiprocessing_context is None  # the platform default (fork on Linux)
    seen = []
    for batch in loader:
        check_batch(store, batch)
        seen += batch["keys"]
    assert sorted(seen) == sorted(store)
    assert seen == [store.dataset().__getitems__(b)[i]["key"] for b in plan for i in range(len(b))]


def test_dataset_pickles_without_handles_and_reopens(read_store):
    ds = erstore.open(read_store).dataset(labels={k: 1 for k in list(erstore.open(read_store))[:3]})
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None and len(clone) == 3
    np.testing.assert_array_equal(clone[2]["hidden_states"].numpy(), ds[2]["hidden_states"].numpy())
    assert clone.version == ds.version


def test_import_erstore_does_not_import_torch():
    code = "import sys, erstore; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("codec", ["shuffle", "int8", "int4:group=16", "entropy:pca=1"])
def test_fork_safe_reader_matches_tensorstore_for_every_codec(tiny_bert, tmp_path, codec):
    from erstore.localread import LocalReader

    rows = [{"text": f"Sentence {i} talks about {w} and more {w}."} for i, w in enumerate("abcdefghij")]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(corpus), store=str(tmp_path / "s"),
                  dtype="float16", codec=codec, progress=False, max_length=64)
    store = erstore.open(tmp_path / "s")
    order = np.arange(len(store))[::-1]
    local = LocalReader(store.location.spec["path"], store.index, store.codec, store.recipe.hidden_size)
    for a, b in zip(store.read_positions(order), local.read_positions(order)):
        assert a.key == b.key and a.boundary == b.boundary
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.states, b.states)


@pytest.fixture(scope="module")
def codec_stores(tiny_bert, tmp_path_factory):
    """One small store per codec, each built in two builds (so batches mix codec parameters)."""
    import json

    root = tmp_path_factory.mktemp("codec-stores")
    stores = {}
    for codec in ["float16", "shuffle", "int8", "int4:group=16", "entropy:pca=1"]:
        path = root / codec.replace(":", "-").replace("=", "")
        for build in range(2):
            rows = [{"text": f"Build {build} sentence {i} is about {w} and {w * (i % 3 + 1)}."}
                    for i, w in enumerate("abcdefghijklmnop")]
            corpus = root / f"c{build}.jsonl"
            corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
            erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(corpus), store=str(path),
                          dtype="bfloat16" if codec == "shuffle" else "float16", codec="lossless" if codec == "float16" else codec,
                          progress=False, max_length=64)
        stores[codec] = path
    return stores


@pytest.mark.parametrize("layout", ["host", "host-per-item", "device-on-cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("codec", ["float16", "shuffle", "int8", "int4:group=16", "entropy:pca=1"])
def test_loader_batches_equal_collate_of_items(codec_stores, codec, dtype, layout, monkeypatch):
    # The Loader lays batches out with vectorised gathers (or, for wide mostly-padded runs, item
    # by item); Collate pads items one by one. Same bits for every codec but int4's rotation (a
    # BLAS product over differently grouped rows).
    from erstore.torchdata import assemble

    on_device = layout == "device-on-cpu"
    if layout == "host-per-item":  # the tiny model is narrow: force the per-item path
        monkeypatch.setattr(assemble, "PER_ITEM_MIN_D", 1)
        monkeypatch.setattr(assemble, "PER_ITEM_PAD_FRACTION", 0.0)
        calls = []
        real = assemble.Group._per_item
        monkeypatch.setattr(assemble.Group, "_per_item", lambda self, *a: calls.append(1) or real(self, *a))
    store = erstore.open(codec_stores[codec])
    keys = list(store)
    assert len(store.index.arrays) == 2
    lengths = {k: len(store.get(k)) for k in keys}
    labels = {k: {"labels": i % 3, "tags": np.arange(lengths[k]) % 5, "pair": [i, -i], "name": k[:4]}
              for i, k in enumerate(keys)}
    options = dict(labels=labels, batch_size=5, shuffle=True, seed=3, block_rows=16, buffer_blocks=2, dtype=dtype)
    loader = store.loader(**options, prefetch=2, decode_on_device=on_device)
    ds = store.dataset(labels=labels, dtype=dtype)
    batches = loader.plan.epoch_batches(0)
    got = list(loader)
    assert len(got) == len(batches) > 3
    collate = Collate(dtype=dtype)
    for batch, idx in zip(got, batches):
        want = collate(ds.__getitems__(idx.tolist()))
        assert batch.keys() == want.keys() and batch["keys"] == want["keys"] and batch["name"] == want["name"]
        for name in ("attention_mask", "input_ids", "boundaries", "labels", "tags", "pair"):
            assert batch[name].dtype == want[name].dtype and torch.equal(batch[name], want[name]), name
        assert batch["hidden_states"].dtype == dtype and batch["hidden_states"].is_contiguous()
        if codec.startswith("int4"):
            torch.testing.assert_close(batch["hidden_states"], want["hidden_states"], rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(batch["hidden_states"], want["hidden_states"])
        assert (batch["tags"][batch["attention_mask"] == 0] == -100).all()
    if layout == "host-per-item" and assemble.row_independent(store.codec):
        assert calls  # the per-item path really ran


@pytest.mark.parametrize("fraction", [0.0, 2.0], ids=["padded-copy", "real-rows-copy"])
def test_device_layout_both_copy_forms(codec_stores, monkeypatch, fraction):
    # Lossless runs travel padded (one cast on the device) or as real rows scattered into place.
    from erstore.torchdata import assemble

    monkeypatch.setattr(assemble, "PADDED_FRACTION", fraction)
    store = erstore.open(codec_stores["shuffle"])
    options = dict(batch_size=5, shuffle=True, seed=3, block_rows=16, buffer_blocks=2)
    host = list(store.loader(**options))
    device = list(store.loader(**options, decode_on_device=True))
    assert len(host) == len(device) > 3
    for a, b in zip(host, device):
        assert a.keys() == b.keys() and a["keys"] == b["keys"]
        for name in ("hidden_states", "attention_mask", "input_ids", "boundaries"):
            assert torch.equal(a[name], b[name]), name


def test_switch_interval_is_lowered_while_an_epoch_runs_and_restored(read_store):
    store = erstore.open(read_store)
    before = sys.getswitchinterval()
    loader = store.loader(batch_size=4)
    first, second = iter(loader), iter(store.loader(batch_size=4))
    next(first)
    assert sys.getswitchinterval() == min(before, 0.0005)
    first.close()
    assert sys.getswitchinterval() == min(before, 0.0005)  # the second epoch still runs
    second.close()
    assert sys.getswitchinterval() == before
    sum(1 for _ in loader)  # a whole epoch ends by itself
    assert sys.getswitchinterval() == before
