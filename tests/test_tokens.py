"""erstore.tokens / erstore.tokenplan: the token-level feed on real (tiny-model) stores.

Small `block_rows` and `buffer_bytes` make the tiny stores span many blocks and shuffle windows,
so block permutation, windows, read-ahead and batches that straddle windows are all exercised.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import erstore
from erstore.errors import InvalidInputError, KeyNotFoundError
from erstore.tokenplan import TokenPlan, token_blocks
from erstore.tokens import TokenFeed, special_token_ids
from tests.conftest import write_jsonl

SMALL = {"block_rows": 16, "buffer_bytes": 3 * 16 * 32 * 4}  # 3 blocks of 16 fp32 rows of d=32


@pytest.fixture(scope="module")
def two_builds(tiny_bert, tmp_path_factory):
    """A float16 store of two builds (two array slots), so blocks come from two sets of arrays."""
    root = tmp_path_factory.mktemp("tokens-store")
    for i, words in enumerate(("alpha beta gamma delta", "one two three four five six")):
        rows = [{"id": f"b{i}-{j}", "text": f"Build {i} sentence {j}: {w} " * (1 + j % 3)}
                for j, w in enumerate(words.split() * 4)]
        erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(write_jsonl(root / f"c{i}.jsonl", rows)),
                      store=str(root / "store"), dtype="float16", progress=False, max_length=32, id_field="id")
    store = erstore.open(root / "store")
    assert len(store.index.arrays) == 2
    return root / "store"


def stored_tokens(store: erstore.Store, keys=None) -> dict[tuple[int, int], tuple[np.ndarray, int]]:
    """(sequence position, token position) -> (states row, token id) for every stored token."""
    positions = np.arange(len(store)) if keys is None else np.sort(store.index.find(list(keys)))
    out = {}
    for p, e in zip(positions.tolist(), store.read_positions(positions)):
        for t in range(len(e.token_ids)):
            out[(p, t)] = (e.states[t], int(e.token_ids[t]))
    return out


def delivered(feed, epoch: int = 0, start: int = 0) -> list:
    return list(feed.batches(epoch, start))


def rows_of(batches) -> list[tuple[int, int]]:
    return [(int(s), int(p)) for b in batches for s, p in zip(b.sequences, b.positions)]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, 64, 10_000])
def test_every_stored_token_once_with_its_states_id_and_key(read_store, shuffle, batch_size):
    store = erstore.open(read_store)
    truth = stored_tokens(store)
    feed = store.tokens(batch_size=batch_size, shuffle=shuffle, seed=3, **SMALL)
    batches = delivered(feed)
    assert len(batches) == len(feed) == -(-len(truth) // batch_size)
    assert all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
    assert [b.step for b in batches] == list(range(len(batches)))
    seen = rows_of(batches)
    assert len(seen) == len(set(seen)) == len(truth) and set(seen) == set(truth)
    keys = list(store)
    for b in batches[:3]:
        assert b.keys == [keys[s] for s in b.sequences.tolist()]
        for i, (s, p) in enumerate(zip(b.sequences.tolist(), b.positions.tolist())):
            np.testing.assert_array_equal(b.states[i], truth[(s, p)][0])
            assert b.token_ids[i] == truth[(s, p)][1]
    if not shuffle:  # storage order: the sequential scan
        assert seen == sorted(truth, key=lambda sp: (store.index.records["row"][sp[0]], sp[1]))


def test_shuffle_mixes_tokens_across_the_store(read_store):
    store = erstore.open(read_store)
    feed = store.tokens(batch_size=64, seed=0, block_rows=16, buffer_bytes=1 << 30)  # one window: uniform
    first = next(iter(feed))
    rows = store.index.records["row"][first.sequences] + first.positions
    assert len(np.unique(first.sequences)) > 10  # not one sequence's run
    assert np.ptp(rows) > 0.5 * store.index.total_tokens  # drawn from all over the store
    assert not (np.diff(rows) > 0).all()


def test_seeded_reproducible_and_different_per_epoch_and_seed(read_store):
    store = erstore.open(read_store)
    a = rows_of(delivered(store.tokens(batch_size=50, seed=1, **SMALL)))
    b = rows_of(delivered(erstore.open(read_store).tokens(batch_size=50, seed=1, **SMALL)))
    assert a == b
    assert a != rows_of(delivered(store.tokens(batch_size=50, seed=1, **SMALL), epoch=1))
    assert a != rows_of(delivered(store.tokens(batch_size=50, seed=2, **SMALL)))
    assert sorted(a) == sorted(rows_of(delivered(store.tokens(batch_size=50, seed=2, **SMALL))))


@pytest.mark.parametrize("start", [0, 1, 5, 13])
def test_resume_from_a_step_equals_the_rest_of_the_epoch(read_store, start):
    store = erstore.open(read_store)
    feed = store.tokens(batch_size=37, seed=4, **SMALL)
    full = delivered(feed, epoch=2)
    rest = delivered(store.tokens(batch_size=37, seed=4, **SMALL), epoch=2, start=start)
    assert [b.step for b in rest] == [b.step for b in full[start:]]
    for x, y in zip(full[start:], rest, strict=True):
        np.testing.assert_array_equal(x.states, y.states)
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.sequences, y.sequences)


def test_state_dict_resumes_an_interrupted_epoch_and_then_moves_on(read_store, monkeypatch):
    store = erstore.open(read_store)
    feed = store.tokens(batch_size=40, seed=5, **SMALL)
    reference = rows_of(delivered(feed, epoch=0)) + rows_of(delivered(feed, epoch=1))
    got = []
    for i, batch in enumerate(feed):
        got += rows_of([batch])
        if i == 3:
            break
    state = feed.state_dict()
    assert state == {"epoch": 0, "step": 4, "seed": 5}
    again = store.tokens(batch_size=40, seed=5, **SMALL)
    again.load_state_dict(state)
    got += rows_of(list(again)) + rows_of(list(again))  # rest of epoch 0, then epoch 1
    assert got == reference
    with pytest.raises(InvalidInputError, match="seed"):
        store.tokens(seed=6).load_state_dict(state)


def record_runs(monkeypatch) -> list[tuple[int, int, int]]:
    """Every (slot, first row, end row) the feed reads from storage, in order."""
    runs: list[tuple[int, int, int]] = []
    original = TokenFeed._layout

    def spy(self, block_ids):
        out = original(self, block_ids)
        runs.extend(out[0])
        return out

    monkeypatch.setattr(TokenFeed, "_layout", spy)
    return runs


def test_resume_reads_only_the_windows_it_needs(read_store, monkeypatch):
    store = erstore.open(read_store)
    feed = store.tokens(batch_size=16, seed=0, **SMALL)
    runs = record_runs(monkeypatch)
    next(iter(feed.batches(0, start=len(feed) - 1)))
    last_window = feed.plan.windows(0)[-1]
    assert 0 < len(runs) <= len(last_window)
    assert sum(b - a for _, a, b in runs) <= len(last_window) * 16


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_are_disjoint_and_together_complete(two_builds, world, drop_last):
    store = erstore.open(two_builds)
    truth = stored_tokens(store)
    feeds = [store.tokens(batch_size=24, seed=9, rank=r, world_size=world, drop_last=drop_last, **SMALL)
             for r in range(world)]
    shares = [rows_of(delivered(f, epoch=1)) for f in feeds]
    union = [sp for share in shares for sp in share]
    assert len(union) == len(set(union))
    assert min(f.tokens for f in feeds) > 0.5 * max(f.tokens for f in feeds)  # balanced
    if drop_last:  # the same number of full batches on every rank (DDP steps stay in lockstep)
        assert len({len(f) for f in feeds}) == 1
        assert all(len(s) == len(feeds[0]) * 24 for s in shares)
        assert len(feeds[0]) == min(f.tokens for f in feeds) // 24 and set(union) <= set(truth)
    else:
        assert set(union) == set(truth) and len(union) == len(truth)
        # The split is fixed per seed: every epoch a rank sees the same tokens, in a new order.
        again = rows_of(delivered(feeds[0], epoch=2))
        assert sorted(again) == sorted(shares[0]) and again != shares[0]


def test_key_subset_yields_exactly_its_tokens(two_builds):
    store = erstore.open(two_builds)
    keys = list(store)[::3] + list(store)[:2]  # repeats are read once
    truth = stored_tokens(store, set(keys))
    batches = delivered(store.tokens(keys, batch_size=10, seed=0, **SMALL))
    seen = rows_of(batches)
    assert len(seen) == len(truth) and set(seen) == set(truth)
    for b in batches:
        for i, (s, p) in enumerate(zip(b.sequences.tolist(), b.positions.tolist())):
            np.testing.assert_array_equal(b.states[i], truth[(s, p)][0])
    with pytest.raises(KeyNotFoundError, match="1 key"):
        store.tokens([keys[0], "0" * 32])


def test_dropping_special_tokens_ids_and_first_positions(read_store):
    store = erstore.open(read_store)
    truth = stored_tokens(store)
    specials = special_token_ids(store)
    assert {101, 102} <= specials and 100 not in specials  # [CLS], [SEP] dropped; [UNK] is content
    kept = {sp for sp, (_, tid) in truth.items() if tid not in specials and sp[1] >= 2}
    feed = store.tokens(batch_size=33, seed=0, drop_special=True, drop_first=2, **SMALL)
    batches = delivered(feed)
    assert set(rows_of(batches)) == kept and len(rows_of(batches)) == len(kept) == feed.tokens
    assert not np.isin(np.concatenate([b.token_ids for b in batches]), list(specials)).any()
    assert min(int(b.positions.min()) for b in batches) >= 2
    common = max({t for _, t in truth.values()}, key=[t for _, t in truth.values()].count)
    feed = store.tokens(batch_size=33, seed=0, drop_ids=[common], **SMALL)
    assert sum(len(b) for b in feed.batches(0)) == sum(t != common for _, t in truth.values())


def test_each_block_is_read_once_per_epoch_not_once_per_batch(two_builds, monkeypatch):
    store = erstore.open(two_builds)
    feed = store.tokens(batch_size=8, seed=0, **SMALL)
    runs = record_runs(monkeypatch)
    n = len(delivered(feed))
    assert len(runs) <= len(feed.blocks) < n
    spans = sorted(runs)
    assert all(s0 != s1 or b0 <= a1 for (s0, _, b0), (s1, a1, _) in itertools.pairwise(spans))  # no row twice
    assert sum(b - a for _, a, b in runs) == store.index.total_tokens  # every stored row read, once


def test_float16_store_dtype_option_and_torch_batches(two_builds):
    import torch

    store = erstore.open(two_builds)
    b16 = next(iter(store.tokens(batch_size=20, seed=0)))
    b32 = next(iter(store.tokens(batch_size=20, seed=0, dtype="float32")))
    assert b16.states.dtype == np.float16 and b32.states.dtype == np.float32
    np.testing.assert_array_equal(b16.states.astype(np.float32), b32.states)
    t = b16.torch()
    assert t["states"].dtype == torch.float16 and t["input_ids"].dtype == torch.int64
    assert torch.equal(t["states"].float(), torch.from_numpy(b32.states))
    assert torch.equal(t["positions"], torch.from_numpy(b16.positions))


@pytest.mark.parametrize("codec", ["int8", "shuffle"])
def test_codec_stores_decode_as_store_read(tiny_bert, tmp_path, codec):
    rows = [{"text": f"Sentence {i} talks about {w} and more {w}."} for i, w in enumerate("abcdefghij")]
    erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(write_jsonl(tmp_path / "c.jsonl", rows)),
                  store=str(tmp_path / "s"), dtype="float16", codec=codec, progress=False, max_length=64)
    store = erstore.open(tmp_path / "s")
    truth = stored_tokens(store)
    batches = delivered(store.tokens(batch_size=16, seed=1, block_rows=16))
    assert len(rows_of(batches)) == len(truth)
    for b in batches:
        for i, sp in enumerate(zip(b.sequences.tolist(), b.positions.tolist())):
            np.testing.assert_array_equal(b.states[i], truth[sp][0])


def test_bad_options_are_clear_errors(read_store):
    store = erstore.open(read_store)
    for options, match in [({"batch_size": 0}, "batch_size"), ({"rank": 2, "world_size": 2}, "rank"),
                           ({"drop_first": -1}, "drop_first"), ({"buffer_bytes": 0}, "buffer_bytes")]:
        with pytest.raises(InvalidInputError, match=match):
            store.tokens(**options)


def test_empty_selection_yields_nothing_and_a_closed_feed_reopens(read_store):
    store = erstore.open(read_store)
    feed = store.tokens(drop_first=10_000)
    assert len(feed) == 0 and list(feed.batches(0)) == []
    with store.tokens(batch_size=10_000) as feed:
        first = next(iter(feed))
    again = next(feed.batches(0))  # closing dropped handles only; they reopen on use
    np.testing.assert_array_equal(first.states, again.states)


def test_import_tokens_does_not_import_torch_or_transformers():
    code = ("import sys, erstore, erstore.tokens; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), block_rows=st.integers(1, 50),
       drop_first=st.integers(0, 5), batch_size=st.integers(1, 60), world=st.integers(1, 4),
       buffer_blocks=st.integers(1, 5), seed=st.integers(0, 3))
def test_plan_covers_every_row_once_across_ranks(lengths, block_rows, drop_first, batch_size, world,
                                                  buffer_blocks, seed):
    length = np.array(lengths)
    row = np.r_[0, np.cumsum(length)[:-1]]
    slot = np.zeros(len(length), dtype=np.int64)
    slot[len(length) // 2 :] = 1  # two builds, rows restarting at 0 in the second
    row[len(length) // 2 :] -= row[len(length) // 2]
    blocks = token_blocks(slot, row, length, np.arange(len(length)), drop_first=drop_first,
                          block_rows=block_rows)
    wanted = {(s, r) for s, r0, n in zip(slot, row, length) for r in range(r0 + min(n, drop_first), r0 + n)}
    got = [(int(blocks.slot[b]), r) for b in range(len(blocks))
           for p in range(blocks.first[b], blocks.first[b + 1]) for r in range(blocks.p_start[p], blocks.p_stop[p])]
    assert sorted(got) == sorted(wanted)
    assert all(blocks.hi[b] - blocks.lo[b] <= block_rows for b in range(len(blocks)))
    counts = blocks.rows()
    plans = [TokenPlan(counts, batch_size=batch_size, seed=seed, buffer_blocks=buffer_blocks, rank=r,
                       world_size=world) for r in range(world)]
    owned = np.concatenate([p.blocks for p in plans])
    assert sorted(owned.tolist()) == list(range(len(blocks)))
    for p in plans:
        windows = p.windows(0)
        assert sorted(np.concatenate(windows or [np.zeros(0, int)]).tolist()) == sorted(p.blocks.tolist())
        assert len(p) == -(-p.tokens // batch_size)


def test_example_trains_a_probe_and_an_sae_on_the_token_feed(read_store):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "examples" / "tokens_probe_sae.py"), "--store", str(read_store), "--epochs", "8",
           "--batch-size", "64", "--sae-batch-size", "64", "--l1", "0.05", "--classes", "5", "--latents", "64",
           "--test-every", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["probe_test_tokens"] > 0 and result["sae_test_tokens"] > 0
    assert result["probe_accuracy"] > result["probe_majority_baseline"] + 0.2
    assert result["sae_fvu"] < 0.8 and 0 < result["sae_l0"] < 64


def test_drop_overlap_yields_each_document_token_once(read_store):
    from tests.conftest import NER_ROWS, SENTENCES

    store = erstore.open(read_store)
    feed = store.tokens(batch_size=50, seed=2, drop_overlap=True, drop_special=True, **SMALL)
    got: dict[int, dict[int, int]] = {}
    for b in feed.batches(0):
        for s, p, t in zip(b.sequences.tolist(), b.positions.tolist(), b.token_ids.tolist()):
            got.setdefault(s, {})[p] = t
    tokenizer = store._tokenizer.tokenizer
    texts = {"long": " ".join(SENTENCES * 6), "n2": " ".join(NER_ROWS[2]["tokens"])}
    for doc, text in texts.items():
        windows = store.index.find(store.windows(doc))
        assert len(windows) >= 2
        ids = [got[w][p] for w in windows.tolist() for p in sorted(got[w])]
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    # Without it, the windows after the first repeat `stride` tokens each.
    plain = store.tokens(batch_size=50, drop_special=True, **SMALL)
    n_windows = sum(len(store.windows(doc)) - 1 for doc in texts)
    assert plain.tokens - feed.tokens == n_windows * store.recipe.stride


def test_drop_overlap_refuses_text_pair_stores(qa_store):
    with pytest.raises(InvalidInputError, match="single-text"):
        erstore.open(qa_store).tokens(drop_overlap=True)


@pytest.mark.slow
def test_feed_over_object_storage(tiny_bert, corpus, s3_server, s3_url, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(corpus), store=s3_url, dtype="float32",
                  max_length=64, progress=False, id_field="id")
    store = erstore.open(s3_url)
    truth = stored_tokens(store)
    batches = delivered(store.tokens(batch_size=25, seed=0, drop_overlap=True))
    seen = rows_of(batches)
    assert len(seen) == len(set(seen)) and set(seen) < set(truth)  # the long document's overlaps left out
    for b in batches:
        for i, sp in enumerate(zip(b.sequences.tolist(), b.positions.tolist())):
            np.testing.assert_array_equal(b.states[i], truth[sp][0])
