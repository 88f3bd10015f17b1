"""On-disk metadata: golden bytes of the index format, version checks, parser fuzzing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from erstore.errors import CorruptStoreError, IncompatibleStoreError
from erstore.manifest import (
    FORMAT_VERSION,
    RECORD_DTYPE,
    Counts,
    Recipe,
    StoreMeta,
    VersionManifest,
    decode_index,
    encode_index,
    parse_version_key,
    version_key,
)


def recipe(**changes) -> Recipe:
    base = dict(model_fingerprint="ab" * 16, layer=3, tokenizer_fingerprint="cd" * 16, max_length=128,
                stride=32, codec={"name": "lossless", "dtype": "float16", "zstd_level": 1},
                hidden_size=384, num_layers=6, model_name="m")
    return Recipe(**{**base, **changes})


def test_index_golden_bytes():
    records = np.array([(1, 2, 3, 4, 0, 5, 0)], dtype=RECORD_DTYPE)
    raw = encode_index(records, ["build-a"])
    header = b'{"arrays": ["build-a"], "count": 1}'
    expected = (b"ERSTIDX\n" + (1).to_bytes(4, "little") + len(header).to_bytes(4, "little") + header
                + (1).to_bytes(8, "little") + (2).to_bytes(8, "little") + (3).to_bytes(8, "little")
                + (4).to_bytes(8, "little") + (0).to_bytes(4, "little") + (5).to_bytes(4, "little")
                + (0).to_bytes(4, "little"))
    assert raw == expected
    assert RECORD_DTYPE.itemsize == 44


def test_version_manifest_golden_fields():
    m = VersionManifest(version=2, created="t", indexes=("a", "b"), added=Counts(1, 2, 3),
                        totals=Counts(4, 5, 6), parent=1)
    data = json.loads(m.to_json())
    assert data == {"version": 2, "created": "t", "indexes": ["a", "b"],
                    "added": {"sequences": 1, "tokens": 2, "bytes": 3},
                    "totals": {"sequences": 4, "tokens": 5, "bytes": 6}, "build": {}, "parent": 1,
                    "format_version": FORMAT_VERSION}
    assert VersionManifest.from_json(m.to_json(), "x") == m


@given(st.lists(st.tuples(*(st.integers(0, 2**64 - 1) for _ in range(4)),
                          *(st.integers(0, 2**32 - 1) for _ in range(2)), st.integers(0, 2**32 - 1)),
                max_size=20))
def test_index_round_trip(rows):
    records = np.array(rows, dtype=RECORD_DTYPE)
    records["array"] = 0
    back, arrays = decode_index(encode_index(records, ["x"]), "f")
    assert arrays == ["x"] and back.tobytes() == records.tobytes()


@given(st.binary(max_size=200))
def test_index_parser_fuzz_raises_only_store_errors(raw):
    try:
        decode_index(raw, "fuzz")
    except (CorruptStoreError, IncompatibleStoreError):
        pass


def test_truncated_index_is_reported():
    raw = encode_index(np.zeros(3, dtype=RECORD_DTYPE), ["x"])
    with pytest.raises(CorruptStoreError, match="truncated"):
        decode_index(raw[:-5], "idx")


def test_newer_format_version_asks_to_upgrade():
    meta = json.loads(StoreMeta(recipe(), "now", {}).to_json())
    meta["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(IncompatibleStoreError, match="upgrade erstore"):
        StoreMeta.from_json(json.dumps(meta).encode(), "erstore.json")


def test_recipe_differences_name_the_field():
    assert recipe().differences(recipe()) == []
    diffs = recipe().differences(recipe(layer=2, model_name="other"))
    assert diffs == ["layer: store has 3, this build has 2"]  # model_name is not identity


@given(st.integers(1, 10**7))
def test_version_key_round_trip(n):
    assert parse_version_key(version_key(n)) == n


@pytest.mark.parametrize("key", ["versions/abc.json", "versions/00000001.tmp", "index/00000001.json"])
def test_non_version_keys_are_ignored(key):
    assert parse_version_key(key) is None
