"""Verified reads: a flipped byte in a chunk fails every read path; format-1 stores still read.

Complements tests/test_hostile.py (many kinds of damage, every reader) with the read paths that
need torch: the Loader's thread with host and on-device decoding, and DataLoader workers forked
after TensorStore ran (they read through erstore.localread). `tests/data/format1-store` was
written by erstore's format-1 code (commit ba5c11f) and pins that those stores keep working.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import erstore
from erstore.errors import CorruptStoreError
from erstore.manage import copy
from erstore.verify import verify
from tests.test_hostile import make_store

FORMAT1 = Path(__file__).parent / "data" / "format1-store"


def flip_chunk_byte(root: Path) -> None:
    """Flip one bit in the middle of the first states chunk of the oldest build."""
    chunk = min(root.glob("arrays/*/states/c/0/0"))  # build ids start with their UTC time
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))


@pytest.fixture
def damaged(tmp_path) -> Path:
    path = tmp_path / "s"
    make_store(path)
    flip_chunk_byte(path)
    return path


def test_get_names_the_key_and_suggests_verify(damaged):
    store = erstore.open(damaged)
    key = next(iter(store))
    with pytest.raises(CorruptStoreError, match=rf"key {key}.*erstore verify"):
        store.get(key)


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_loader_thread_raises_on_a_flipped_byte(damaged, decode_on_device):
    store = erstore.open(damaged)
    with pytest.raises(CorruptStoreError, match="erstore verify"), \
            store.loader(batch_size=4, decode_on_device=decode_on_device) as loader:
        for _ in loader:
            pass


def test_forked_dataloader_workers_raise_on_a_flipped_byte(damaged):
    from torch.utils.data import DataLoader

    from erstore.torchdata import Collate

    store = erstore.open(damaged)
    ds = store.dataset()
    store.read([])  # TensorStore has run in this process, so forked workers cannot use it
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=Collate())
    assert loader.multiprocessing_context is None  # fork on Linux: workers read via localread
    with pytest.raises(CorruptStoreError, match="(checksum|damaged).*erstore verify"):
        for _ in loader:
            pass


def test_format1_store_reads_unverified_and_copy_makes_it_verified(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(FORMAT1, old)
    store = erstore.open(old)
    info = store.info()
    assert info["format_version"] == 1 and info["verified_reads"] is False
    assert "unverified" in info["note"] and "erstore copy" in info["note"]
    rng = np.random.default_rng(1)  # how tests/data/format1-store was written
    for i, entry in enumerate(store.read(list(store))):
        np.testing.assert_array_equal(entry.states, rng.standard_normal((3 + i, 8)).astype(np.float32))
        assert entry.token_ids.tolist() == list(range(i, 3 + 2 * i))
    assert store.windows("doc2") == [list(store)[2]]
    assert verify(store).ok

    copy(str(old), str(tmp_path / "new"))
    new = erstore.open(tmp_path / "new")
    assert new.info()["verified_reads"] is True and "note" not in new.info()
    for a, b in zip(store.read(list(store)), new.read(list(store))):
        assert a.states.tobytes() == b.states.tobytes() and a.token_ids.tolist() == b.token_ids.tolist()
    assert new.windows("doc2") == store.windows("doc2")


def test_appending_to_a_format1_store_keeps_old_builds_readable(tmp_path):
    from erstore.keys import key_for_ids
    from erstore.writer import StoreWriter

    old = tmp_path / "old"
    shutil.copytree(FORMAT1, old)
    before = erstore.open(old)
    with StoreWriter(old, before.recipe) as w:
        ids = [7, 7, 7, 7]
        w.append(key_for_ids(ids), np.ones((4, 8), np.float32), np.asarray(ids))
        w.commit()
    after = erstore.open(old)
    assert after.version == 2 and len(after) == len(before) + 1
    assert after.manifest.files and not after.meta.verified  # new build recorded, store still format 1
    assert len(after.read(list(after))) == len(after)
    flip_chunk_byte(old)  # the format-1 build's chunk: no zstd checksum, yet verify still finds it
    assert not verify(erstore.open(old)).ok


def test_a_changed_tag_is_refused_not_followed(tmp_path):
    from erstore.keys import key_for_ids
    from erstore.manage import tag
    from erstore.writer import StoreWriter

    path = tmp_path / "s"
    make_store(path)
    with StoreWriter(path, erstore.open(path).recipe) as w:
        w.append(key_for_ids([1, 2, 3]), np.ones((3, 32), np.float32), np.asarray([1, 2, 3]))
        w.commit()
    tag(str(path), 1, "release")
    assert erstore.open(path, version="release").version == 1
    tag_file = path / "tags" / "release.json"
    tag_file.write_text(tag_file.read_text().replace('"version": 1', '"version": 2'))
    with pytest.raises(CorruptStoreError, match="release.json does not match its checksum"):
        erstore.open(path, version="release")
