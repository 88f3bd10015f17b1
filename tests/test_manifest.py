"""On-disk metadata: golden bytes of the index format, version checks, parser fuzzing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from erstore.errors import CorruptStoreError, IncompatibleStoreError
from erstore.integrity import seal
from erstore.manifest import (
    FORMAT_VERSION,
    NEWEST_FORMAT,
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
    expected = (b"ERSTIDX\n" + (2).to_bytes(4, "little") + len(header).to_bytes(4, "little") + header
                + (1).to_bytes(8, "little") + (2).to_bytes(8, "little") + (3).to_bytes(8, "little")
                + (4).to_bytes(8, "little") + (0).to_bytes(4, "little") + (5).to_bytes(4, "little")
                + (0).to_bytes(4, "little"))
    assert raw == expected
    assert RECORD_DTYPE.itemsize == 44


def test_version_manifest_golden_fields():
    files = {"index/a.idx": {"bytes": 60, "xxh3_64": "xxh3-64:0123456789abcdef"}}
    m = VersionManifest(version=2, created="t", indexes=("a", "b"), added=Counts(1, 2, 3),
                        totals=Counts(4, 5, 6), parent=1, files=files)
    data = json.loads(m.to_json())
    assert data == {"version": 2, "created": "t", "indexes": ["a", "b"],
                    "added": {"sequences": 1, "tokens": 2, "bytes": 3},
                    "totals": {"sequences": 4, "tokens": 5, "bytes": 6}, "build": {}, "parent": 1,
                    "format_version": 2, "files": files,
                    # xxh3-64 of the canonical JSON (indent 2, sorted keys) of every other field
                    "checksum": "xxh3-64:3ac644e4b9f62afc"}
    assert FORMAT_VERSION == 2
    assert VersionManifest.from_json(m.to_json(), "x") == m


def test_store_meta_golden_bytes():
    raw = StoreMeta(recipe(), "t", {"erstore": "0"}).to_json()
    assert raw.startswith(b'{\n  "checksum": "xxh3-64:')
    data = json.loads(raw)
    assert data["format_version"] == 2 and data["checksum"] == "xxh3-64:d7865a4856a62490"
    assert StoreMeta.from_json(raw, "x").recipe == recipe()


def test_format_1_files_still_parse_unverified():
    m = VersionManifest(version=1, created="t", indexes=("a",), added=Counts(1, 2, 3), totals=Counts(1, 2, 3),
                        format_version=1)
    raw = m.to_json()
    assert b"checksum" not in raw and b"files" not in raw
    assert VersionManifest.from_json(raw, "x").files == {}
    meta = StoreMeta(recipe(), "t", {}, format_version=1)
    assert not StoreMeta.from_json(meta.to_json(), "x").verified


def test_array_metadata_pins_checksummed_chunks():
    from erstore.codecs import LosslessCodec
    from erstore.validate import expected_arrays

    arrays = expected_arrays(LosslessCodec("float16"), 384)
    zstd = {"name": "zstd", "configuration": {"level": 1, "checksum": True}}
    assert arrays["states"]["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}, zstd]
    assert arrays["tokens"]["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}, zstd]
    assert arrays["tokens"]["chunk_grid"]["configuration"]["chunk_shape"] == [4096]


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
    meta["format_version"] = NEWEST_FORMAT + 1
    with pytest.raises(IncompatibleStoreError, match="upgrade erstore"):
        StoreMeta.from_json(seal(meta), "erstore.json")
    # Changed without a new checksum, it is damage, not a newer format.
    with pytest.raises(CorruptStoreError, match="does not match its checksum"):
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
