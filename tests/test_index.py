"""The in-memory key index: look-ups, first-occurrence dedup and 64-bit prefix collisions."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from erstore.index import KeyIndex
from erstore.keys import join_key
from erstore.manifest import RECORD_DTYPE


def records(keys):
    r = np.zeros(len(keys), dtype=RECORD_DTYPE)
    r["hi"] = [k[0] for k in keys]
    r["lo"] = [k[1] for k in keys]
    r["row"] = np.arange(len(keys))  # remembers the original position
    return r


# Small value ranges force repeated keys and shared 64-bit prefixes.
keys_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=40)


@given(keys_strategy)
def test_first_occurrence_wins_and_order_is_kept(keys):
    index = KeyIndex(records(keys), ["a"])
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    assert index.records["row"].tolist() == sorted(first.values())
    assert list(index.keys()) == [join_key(*k) for k in sorted(first, key=first.get)]


@given(keys_strategy, st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=20))
def test_find_returns_positions_or_minus_one(keys, queries):
    index = KeyIndex(records(keys), ["a"])
    pos = index.find([join_key(*q) for q in queries])
    for q, p in zip(queries, pos):
        if q in keys:
            assert p >= 0 and index.records["row"][p] == keys.index(q)
        else:
            assert p == -1


def test_merge_renumbers_arrays_and_dedups_across_files():
    a, b = records([(1, 1), (2, 2)]), records([(2, 2), (3, 3)])
    a["array"], b["array"] = 0, 0
    index = KeyIndex.merge([(a, ["build-a"]), (b, ["build-b"])])
    assert index.arrays == ["build-a", "build-b"]
    assert index.records["array"].tolist() == [0, 0, 1]  # (2, 2) read from the older build
    assert index.records["hi"].tolist() == [1, 2, 3]
