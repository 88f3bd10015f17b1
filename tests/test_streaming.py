"""Streaming builds: bounded buffers give the same store, compact structures are exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import erstore
from erstore.builder import BuildConfig, buffered_batches, build
from erstore.docmap import DocMap
from erstore.keys import fast_window_key, window_key
from erstore.keyset import KeySet, halves
from tests.conftest import SENTENCES, write_jsonl


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40), st.integers(0, 50))
def test_fast_window_key_equals_window_key(ids, boundary):
    assert fast_window_key(np.array(ids, dtype="<u4"), boundary) == window_key(ids, boundary)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 300), min_size=0, max_size=200), min_size=1, max_size=12))
def test_keyset_is_an_exact_set(batches):
    ks, reference = KeySet(), set()
    for batch in batches:
        keys = [window_key([i, i % 7]) for i in batch]
        hi, lo = halves(keys)
        new = ks.add_many(hi, lo)
        expected = []
        for k in keys:
            expected.append(k not in reference)
            reference.add(k)
        assert new.tolist() == expected
    probe = [window_key([i, i % 7]) for i in range(0, 400, 3)]
    assert ks.contains_many(*halves(probe)).tolist() == [k in reference for k in probe]
    assert len(ks) == len(reference) and ks.nbytes == 16 * len(reference)


def test_keyset_scalar_adds_and_shared_prefixes():
    ks = KeySet()
    keys = [f"{7:016x}{i:016x}" for i in range(5000)]  # one 64-bit prefix for all
    for k in keys[:4500]:
        ks.add(k)
    assert all(k in ks for k in keys[:4500]) and not any(k in ks for k in keys[4500:])
    assert ks.add_many(*halves(keys)).sum() == 500


def test_docmap_renders_the_json_object():
    m = DocMap()
    m.add('odd "id"\nx', ["a" * 32, "b" * 32])
    m.add("empty", [])
    assert json.loads(bytes(m.to_json())) == {'odd "id"\nx': ["a" * 32, "b" * 32], "empty": []}
    m.close()


def test_buffered_batches_are_full_and_of_one_length():
    rows = [(str(i), np.zeros(n), 0, [1]) for i, n in enumerate([5] * 7 + [3] * 5 + [9] * 2)]
    buffers = [rows[:10], rows[10:]]  # carried rows stay below a buffer: partial batches wait
    batches = list(buffered_batches(buffers, 4))
    assert sorted(r[0] for b in batches for r in b) == sorted(r[0] for r in rows)
    assert all(len({len(r[1]) for r in b}) == 1 for b in batches)
    assert sum(len(b) < 4 for b in batches) <= 3  # one partial batch per length at most


@pytest.fixture
def many(tmp_path):
    rows = [{"id": f"d{i}", "text": f"{SENTENCES[i % 100 % len(SENTENCES)]} Item {i % 100}."} for i in range(300)]
    rows.append({"id": "long", "text": " ".join(SENTENCES * 6)})
    return write_jsonl(tmp_path / "many.jsonl", rows)


def test_small_buffers_build_the_same_store(tiny_bert, many, tmp_path):
    common = dict(model=str(tiny_bert), corpus=str(many), layers=(2,), dtype="float32", max_length=64,
                  batch_size=1, id_field="id", progress=False)
    [one] = build(BuildConfig(store=str(tmp_path / "one"), **common))
    [small] = build(BuildConfig(store=str(tmp_path / "small"), buffer_tokens=64,
                                store_options={"flush_bytes": 4096}, **common))
    a, b = erstore.open(tmp_path / "one"), erstore.open(tmp_path / "small")
    assert set(a) == set(b) and one.computed == small.computed == len(a) < one.windows  # duplicates once
    keys = list(a)
    for x, y in zip(a.read(keys), b.read(keys)):
        assert x.states.tobytes() == y.states.tobytes() and x.token_ids.tolist() == y.token_ids.tolist()
    assert a.windows("long") == b.windows("long") and len(a.windows("long")) > 1
    assert b.manifest.build["first_batch_s"] is not None and "write_wait_s" in b.manifest.build


def test_directory_and_glob_corpora_stream_every_file(tiny_bert, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        write_jsonl(folder / f"part-{s}.jsonl", [{"text": f"Shard {s} document {i}."} for i in range(5)])
    common = dict(model=str(tiny_bert), layers=(2,), max_length=64, progress=False)
    [d] = build(BuildConfig(corpus=str(folder), store=str(tmp_path / "d"), **common))
    [g] = build(BuildConfig(corpus=str(folder / "part-*.jsonl"), store=str(tmp_path / "g"), **common))
    assert d.documents == g.documents == 15 and d.computed == 15
    store = erstore.open(tmp_path / "d")
    assert store.windows("part-1.jsonl:4") == store.keys_for("Shard 1 document 4.")


def test_iter_corpus_shards_files_and_keeps_ids_global(tmp_path):
    from erstore.corpus import iter_corpus

    folder = tmp_path / "c"
    folder.mkdir()
    for s in range(4):
        (folder / f"{s}.txt").write_text("".join(f"file {s} line {i}\n" for i in range(3)))
    whole = [d.id for d in iter_corpus(folder)]
    parts = [[d.id for d in iter_corpus(folder, shard=(r, 3))] for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole) and all(parts)
    one = tmp_path / "one.txt"
    one.write_text("".join(f"line {i}\n" for i in range(10)))
    split = [[d.id for d in iter_corpus(one, shard=(r, 2))] for r in range(2)]
    assert all(split) and sorted(split[0] + split[1], key=int) == [str(i) for i in range(10)]  # a partition


def test_time_based_flushes_journal_without_filling_a_chunk(tiny_bert, corpus, tmp_path):
    """A flush by time makes rows durable and journaled long before `flush_bytes` fills."""
    from erstore.manifest import decode_index

    [built] = build(BuildConfig(model=str(tiny_bert), corpus=str(corpus), store=str(tmp_path / "ref"), layers=(2,),
                                max_length=64, progress=False))
    reference = erstore.open(tmp_path / "ref")
    from erstore.writer import StoreWriter

    keys = list(reference)
    w = StoreWriter(tmp_path / "t", reference.recipe, journal_seconds=0.0)
    for entry in reference.read(keys[:3]):
        w.append(entry.key, entry.states, entry.token_ids)
    w._wait_and_journal()
    journals = sorted((tmp_path / "t" / "journal").rglob("*.idx"))
    assert journals, "no journal after a time-based flush"
    records, _ = decode_index(journals[0].read_bytes(), "j")
    assert len(records) >= 1
    w.close()
    resumed = StoreWriter(tmp_path / "t", reference.recipe)
    assert resumed.adopted_sequences == 3 and not any(resumed.missing(keys[:3]))
    assert built.computed == len(keys)
    resumed.close()
