"""Store round trips through real TensorStore files: bit-exact reads, dedup, versions, errors."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import erstore
from erstore.integrity import seal
from erstore.codecs import LosslessCodec, storage_dtype
from erstore.errors import (
    IncompatibleStoreError,
    KeyNotFoundError,
    StoreNotFoundError,
)
from erstore.keys import key_for_ids
from erstore.manifest import Recipe
from erstore.writer import StoreWriter


def make_recipe(hidden_size: int = 8, dtype: str = "float32", layer: int = 1) -> Recipe:
    return Recipe(model_fingerprint="f" * 32, layer=layer, tokenizer_fingerprint="t" * 32, max_length=64,
                  stride=16, codec=LosslessCodec(dtype).to_dict(), hidden_size=hidden_size, num_layers=2)


def write(path, recipe, seqs, **kw):
    with StoreWriter(path, recipe, **kw) as w:
        for ids, states in seqs:
            key = key_for_ids(ids)
            if not w.contains(key):
                w.append(key, states, np.asarray(ids))
        return w.commit()


def random_seqs(rng, n, d, max_len=40):
    out = []
    for _ in range(n):
        length = int(rng.integers(1, max_len))
        ids = rng.integers(0, 30000, size=length).tolist()
        out.append((ids, rng.standard_normal((length, d)).astype(np.float32) * 10))
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), d=st.sampled_from([1, 8, 33, 384]),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), n=st.integers(1, 30),
       flush_bytes=st.sampled_from([1, 10_000, 1 << 24]))
def test_round_trip_is_bit_exact(tmp_path, seed, d, dtype, n, flush_bytes):
    rng = np.random.default_rng(seed)
    seqs = random_seqs(rng, n, d)
    path = tmp_path / uuid.uuid4().hex
    write(path, make_recipe(d, dtype), seqs, flush_bytes=flush_bytes)
    with erstore.open(path) as store:
        expected = {key_for_ids(ids): (ids, states) for ids, states in seqs}
        assert len(store) == len(expected)
        keys = list(expected)
        for entry in store.read(keys):  # one batched call
            ids, states = expected[entry.key]
            want = states.astype(storage_dtype(dtype))
            assert entry.states.dtype == want.dtype
            assert entry.states.tobytes() == want.tobytes()
            assert entry.token_ids.tolist() == ids
        k0 = keys[0]
        assert store.get(k0).tobytes() == expected[k0][1].astype(storage_dtype(dtype)).tobytes()


def test_identical_sequences_are_stored_once(tmp_path):
    rng = np.random.default_rng(0)
    seqs = random_seqs(rng, 5, 4)
    m = write(tmp_path / "s", make_recipe(4), seqs + seqs[:3])
    assert m.added.sequences == 5
    assert write(tmp_path / "s", make_recipe(4), seqs) is None  # nothing new: no version
    with erstore.open(tmp_path / "s") as store:
        assert len(store) == 5 and store.version == 1


def test_versions_are_isolated(tmp_path):
    rng = np.random.default_rng(1)
    first, second = random_seqs(rng, 4, 4), random_seqs(rng, 3, 4)
    write(tmp_path / "s", make_recipe(4), first)
    old = erstore.open(tmp_path / "s")
    write(tmp_path / "s", make_recipe(4), second)
    new_key = key_for_ids(second[0][0])
    assert old.version == 1 and len(old) == 4 and new_key not in old  # an open reader is frozen
    assert new_key not in erstore.open(tmp_path / "s", version=1)
    latest = erstore.open(tmp_path / "s")
    assert latest.version == 2 and len(latest) == 7 and new_key in latest
    assert [m.added.sequences for m in latest.versions()] == [4, 3]
    assert old.get(key_for_ids(first[0][0])).tobytes() == first[0][1].tobytes()


def test_missing_key_names_the_key_and_version(tmp_path):
    write(tmp_path / "s", make_recipe(4), random_seqs(np.random.default_rng(2), 2, 4))
    store = erstore.open(tmp_path / "s")
    missing = key_for_ids([1, 2, 3])
    with pytest.raises(KeyNotFoundError, match=missing):
        store.get(missing)
    with pytest.raises(KeyError):  # also the built-in
        store.get(missing)


def test_unknown_version_lists_the_existing_ones(tmp_path):
    write(tmp_path / "s", make_recipe(4), random_seqs(np.random.default_rng(3), 2, 4))
    with pytest.raises(StoreNotFoundError, match="no version 7.*has 1"):
        erstore.open(tmp_path / "s", version=7)


def test_path_that_is_not_a_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="not an erstore store"):
        erstore.open(tmp_path)
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(StoreNotFoundError, match="not empty and is not an erstore store"):
        StoreWriter(tmp_path, make_recipe())


def test_other_recipe_is_refused_naming_the_field(tmp_path):
    write(tmp_path / "s", make_recipe(4, layer=1), random_seqs(np.random.default_rng(4), 2, 4))
    with pytest.raises(IncompatibleStoreError, match="layer: store has 1, this build has 2"):
        StoreWriter(tmp_path / "s", make_recipe(4, layer=2))
    with pytest.raises(IncompatibleStoreError, match="codec"):
        StoreWriter(tmp_path / "s", make_recipe(4, dtype="float16"))


def test_newer_store_format_fails_clearly(tmp_path):
    write(tmp_path / "s", make_recipe(4), random_seqs(np.random.default_rng(5), 2, 4))
    meta = json.loads((tmp_path / "s" / "erstore.json").read_text())
    meta["format_version"] = 99  # as a newer erstore would write it: with a valid checksum
    (tmp_path / "s" / "erstore.json").write_bytes(seal(meta))
    with pytest.raises(IncompatibleStoreError, match="format_version 99.*upgrade"):
        erstore.open(tmp_path / "s")


def test_store_is_a_context_manager_and_iterates_keys_in_commit_order(tmp_path):
    seqs = random_seqs(np.random.default_rng(6), 6, 4)
    write(tmp_path / "s", make_recipe(4), seqs)
    with erstore.open(tmp_path / "s") as store:
        assert list(store) == [key_for_ids(ids) for ids, _ in seqs]
        assert store.info()["sequences"] == 6


def test_bytes_on_disk_scale_with_tokens_not_padding(tmp_path):
    # Ragged storage: 10 short sequences and one long one cost about their token count.
    rng = np.random.default_rng(7)
    seqs = [(rng.integers(0, 30000, size=n).tolist(), rng.standard_normal((n, 64)).astype(np.float32))
            for n in [3] * 10 + [500]]
    m = write(tmp_path / "s", make_recipe(64), seqs)
    assert m.added.tokens == 530
    padded = 11 * 500 * 64 * 4
    assert m.added.bytes < 0.2 * padded


def file_reads() -> int:
    import tensorstore as ts

    found = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/read")
    return sum(v.get("value", 0) for m in found if m["name"] == "/tensorstore/kvstore/file/read" for v in m["values"])


def test_cached_chunks_of_a_committed_build_are_not_revalidated(tmp_path):
    rng = np.random.default_rng(0)
    seqs = random_seqs(rng, 5, 8)
    write(tmp_path / "s", make_recipe(8), seqs)
    with erstore.open(tmp_path / "s") as store:
        key = next(iter(store))
        first = store.get(key)
        before = file_reads()
        np.testing.assert_array_equal(store.get(key), first)  # served by the cache pool
        assert file_reads() == before  # no storage request to check the chunk is still current
