"""Builds at corpus scale: index and document map in parts, checked journals, resume without tokenizing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import erstore
from erstore.builder import BuildConfig, build
from erstore.errors import CorruptStoreError
from erstore.integrity import seal
from erstore.localread import LocalReader
from erstore.manage import gc
from erstore.manifest import MAX_PARTS, decode_index_file
from erstore.validate import file_record
from erstore.verify import verify
from erstore.writer import StoreWriter
from tests.conftest import SENTENCES, write_jsonl


@pytest.fixture(scope="module")
def module_docs(tmp_path_factory):
    return make_docs(tmp_path_factory.mktemp("docs"))


@pytest.fixture
def docs(module_docs):
    return module_docs


def make_docs(tmp_path):
    rows = [{"id": f"d{i}", "text": f"{SENTENCES[i % len(SENTENCES)]} Item {i}."} for i in range(60)]
    rows += [{"id": f"dup{i}", "text": rows[i]["text"]} for i in range(10)]  # windows seen before
    rows.append({"id": "long", "text": " ".join(SENTENCES * 4)})
    return write_jsonl(tmp_path / "docs.jsonl", rows)


def common(model, corpus, **kw):
    return dict(model=str(model), corpus=str(corpus), layers=(2,), dtype="float32", max_length=64,
                batch_size=1, id_field="id", progress=False, **kw)


def same_reads(a, b):
    keys = sorted(a)
    assert keys == sorted(b)
    for x, y in zip(a.read(keys), b.read(keys)):
        assert x.states.tobytes() == y.states.tobytes() and x.token_ids.tolist() == y.token_ids.tolist()
    assert a.documents() == b.documents()


@pytest.fixture(scope="module")
def built(tiny_bert, module_docs, tmp_path_factory):
    """The same corpus built whole (one index file) and in parts of 16 records / 10 documents."""
    tmp_path = tmp_path_factory.mktemp("built")
    build(BuildConfig(store=str(tmp_path / "whole"), **common(tiny_bert, module_docs)))
    build(BuildConfig(store=str(tmp_path / "parts"), buffer_tokens=64,
                      store_options={"part_records": 16, "part_documents": 10, "flush_bytes": 4096},
                      **common(tiny_bert, module_docs)))
    return tmp_path / "whole", tmp_path / "parts"


@pytest.fixture
def split_store(built, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    shutil.copytree(built[0], whole)
    shutil.copytree(built[1], parts)
    return whole, parts


def test_parts_read_like_one_index(split_store):
    whole, parts = split_store
    a, b = erstore.open(whole), erstore.open(parts)
    assert a.manifest.format_version == 2 and not a.manifest.parts  # small builds: format 2 as before
    assert "parts" not in json.loads((whole / "versions" / "00000001.json").read_text())
    [build_id] = b.manifest.indexes
    n_index, n_docs = b.manifest.parts[build_id]
    assert b.manifest.format_version == 3 and n_index == -(-len(b) // 16) > 1 and n_docs == -(-71 // 10)
    assert len(list((parts / "index").glob("*.idx"))) == n_index
    assert all(p in b.manifest.files for p in b.manifest.index_paths(build_id) + b.manifest.docs_paths(build_id))
    same_reads(a, b)
    local = LocalReader(parts, b.index, b.codec, b.recipe.hidden_size)
    for x, y in zip(local.read_positions(np.arange(len(b))), b.read_positions(np.arange(len(b)))):
        assert x.states.tobytes() == y.states.tobytes()
    assert verify(b).ok
    assert not gc(str(parts), grace_hours=0).deleted_builds  # every part is kept


def test_an_incremental_build_adds_to_a_parted_store(split_store, tiny_bert, tmp_path):
    _, parts = split_store
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": f"m{i}", "text": f"New text number {i}."} for i in range(20)])
    [res] = build(BuildConfig(store=str(parts), **common(tiny_bert, more)))
    store = erstore.open(parts)
    assert store.version == 2 and res.computed == 20 and len(store.manifest.parts) == 1  # v2's build: one part
    assert store.windows("m3") == store.keys_for("New text number 3.") and store.windows("d5")
    assert verify(store).ok


def hostile(root, edit):
    path = max((root / "versions").glob("*.json"))
    data = json.loads(path.read_text())
    edit(data)
    path.write_bytes(seal(data))
    with pytest.raises(CorruptStoreError):
        erstore.open(root).documents()


def test_hostile_part_lists(split_store):
    _, parts = split_store
    backup = parts.parent / "backup"
    shutil.copytree(parts, backup)

    def fresh():
        shutil.rmtree(parts)
        shutil.copytree(backup, parts)

    def too_many(data):
        [b] = data["parts"]
        data["parts"][b] = [MAX_PARTS + 1, 1]
    hostile(parts, too_many)
    fresh()
    hostile(parts, lambda data: data["parts"].update({"someone-else": [2, 2]}))
    fresh()
    hostile(parts, lambda data: data.update(format_version=2))  # parts in a format-2 manifest
    fresh()

    def one_more(data):  # a part that does not exist
        [b] = data["parts"]
        data["parts"][b][0] += 1
    hostile(parts, one_more)
    fresh()
    last = sorted((parts / "index").glob("*.p*.docs.json"))[-1]
    last.write_bytes(b'{"x": ["' + b"0" * 32 + b'"]}')  # a valid map, but not the recorded one
    with pytest.raises(CorruptStoreError):
        erstore.open(parts).documents()
    fresh()

    path = max((parts / "versions").glob("*.json"))
    data = json.loads(path.read_text())
    data["totals"]["sequences"] = 20  # fewer than the build's parts hold: refused before reading them all
    path.write_bytes(seal(data))
    with pytest.raises(CorruptStoreError, match="brings its build's index to 32 records"):
        erstore.open(parts)
    fresh()

    def unrecorded(data):
        del data["files"][sorted(k for k in data["files"] if ".p0" in k and k.endswith(".idx"))[0]]
    hostile(parts, unrecorded)


class FailingWriter(StoreWriter):
    """Dies after `limit` appends, after earlier flushes became durable (as a kill would)."""

    limit = 24

    def append(self, *args, **kwargs):
        if self._appended >= self.limit:
            raise RuntimeError("killed")
        super().append(*args, **kwargs)


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    """Tokenize 4 documents at a time, so that a small corpus has many resume points."""
    import erstore.builder

    monkeypatch.setattr(erstore.builder, "TOKENIZE_DOCS", 4)


def interrupted(tiny_bert, docs, store):
    with pytest.raises(RuntimeError, match="killed"):
        build(BuildConfig(store=str(store), buffer_tokens=64, **common(tiny_bert, docs)),
              writer=lambda path, recipe, **kw: FailingWriter(path, recipe, **{**kw, "flush_bytes": 2048,
                                                                                   "journal_seconds": 0}))
    assert list((store / "journal").rglob("*.docs")), "no resume point was journaled"


def test_resume_skips_durable_documents_without_tokenizing(tiny_bert, docs, built, tmp_path):
    interrupted(tiny_bert, docs, tmp_path / "s")
    [resumed] = build(BuildConfig(store=str(tmp_path / "s"), buffer_tokens=64, **common(tiny_bert, docs)))
    info = resumed.version.build
    assert info["skipped_documents"] > 0 and resumed.resumed >= FailingWriter.limit // 2
    assert info["tokenized_documents"] == 71 - info["skipped_documents"] == resumed.documents - info["skipped_documents"]
    clean = built[0]  # the same corpus built uninterrupted
    a, b = erstore.open(tmp_path / "s"), erstore.open(clean)
    same_reads(a, b)
    assert resumed.windows == b.manifest.build["windows"] and a.manifest.totals == b.manifest.totals.__class__(
        b.manifest.totals.sequences, b.manifest.totals.tokens, a.manifest.totals.bytes)
    raw_a = b"".join(p.read_bytes() for p in sorted((tmp_path / "s" / "index").glob("*.docs.json")))
    raw_b = b"".join(p.read_bytes() for p in sorted((clean / "index").glob("*.docs.json")))
    assert raw_a == raw_b  # the document map is byte-identical to an uninterrupted build's
    assert not (tmp_path / "s" / "journal").exists() or not any((tmp_path / "s" / "journal").rglob("*"))


def test_another_corpus_is_read_from_the_start(tiny_bert, docs, tmp_path):
    interrupted(tiny_bert, docs, tmp_path / "s")
    rows = [json.loads(line) for line in docs.read_text().splitlines()]
    rows[0]["text"] = "A changed first document."
    changed = write_jsonl(tmp_path / "changed.jsonl", rows)
    [res] = build(BuildConfig(store=str(tmp_path / "s"), **common(tiny_bert, changed)))
    assert res.version.build["skipped_documents"] == 0 and res.resumed > 0  # durable rows still adopted
    store = erstore.open(tmp_path / "s")
    assert store.windows("d0") == store.keys_for("A changed first document.")


def test_a_damaged_journal_is_not_adopted(tiny_bert, docs, built, tmp_path):
    interrupted(tiny_bert, docs, tmp_path / "s")
    journals = sorted((tmp_path / "s" / "journal").rglob("*.idx"))
    counts = [len(decode_index_file(p.read_bytes(), "j", sealed=True)[0]) for p in journals]
    victim = journals[next(i for i, n in enumerate(counts) if n)]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x10  # inside a record: without the journal's own checksum this would be adopted
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="checksum"):
        decode_index_file(bytes(raw), "j", sealed=True)
    with pytest.warns(UserWarning, match="damaged journal"):
        [res] = build(BuildConfig(store=str(tmp_path / "s"), **common(tiny_bert, docs)))
    assert 0 < res.resumed < sum(counts) and res.version.build["skipped_documents"] == 0
    same_reads(erstore.open(tmp_path / "s"), erstore.open(built[0]))


def test_journal_resume_point_records_its_documents(tiny_bert, docs, tmp_path):
    interrupted(tiny_bert, docs, tmp_path / "s")
    for path in sorted((tmp_path / "s" / "journal").rglob("*.idx")):
        _, _, header = decode_index_file(path.read_bytes(), str(path), sealed=True)
        if "input" in header:
            lines = path.with_suffix(".docs").read_bytes()
            assert header["input"]["docs"] == file_record(lines) and header["input"]["documents"] > 0


def test_frontiers_follow_the_batches():
    """After a Frontier(P), every row of the documents before P has been batched; a rare length's
    partial batch waits one buffer at most, so the frontier trails the input by about a buffer."""
    from erstore.builder import Frontier, buffered_batches

    rng = np.random.default_rng(0)
    buffers, docs = [], 0
    for _ in range(6):
        rows = []
        for _ in range(5):  # slices of 4 documents
            rows += [(f"{docs}-{j}", np.zeros(int(rng.choice([3, 3, 3, 7]))), 0, [1], docs) for j in range(4)]
            docs += 4
        buffers.append((rows, docs))
    seen, frontiers = set(), []
    for item in buffered_batches(buffers, 3, frontiers=True):
        if isinstance(item, Frontier):
            assert all(r[0] in seen for rows, _ in buffers for r in rows if r[4] < item.documents)
            frontiers.append(item.documents)
        else:
            assert len({len(r[1]) for r in item}) == 1
            seen.update(r[0] for r in item)
    assert len(seen) == 6 * 20 and frontiers == sorted(frontiers) and len(frontiers) == 6
    assert all(f >= 20 * i for i, f in enumerate(frontiers))  # at most one buffer behind


@pytest.mark.parametrize("track", [False, True])
def test_a_commit_that_lost_the_race_counts_shared_keys_once(tmp_path, track):
    """Two writers open the same version and store overlapping keys; the second to commit rebases
    and counts only what the first did not add (builder-style writers keep no key set)."""
    from erstore.codecs import LosslessCodec
    from erstore.keys import key_for_ids
    from erstore.manifest import Recipe

    recipe = Recipe(model_fingerprint="f", layer=1, tokenizer_fingerprint="t", max_length=8, stride=0,
                    codec=LosslessCodec("float32").to_dict(), hidden_size=4, num_layers=2)
    states = np.ones((3, 4), dtype=np.float32)
    a = StoreWriter(tmp_path / "s", recipe, track_new_keys=track, part_records=4)
    b = StoreWriter(tmp_path / "s", recipe, track_new_keys=track, part_records=4)
    for w, ids in ((a, range(0, 10)), (b, range(6, 20))):
        for i in ids:
            w.append(key_for_ids([i, 1, 2]), states, np.asarray([i, 1, 2]))
    first, second = a.commit(), b.commit()
    assert (first.version, second.version) == (1, 2)
    assert second.added.sequences == 10 and second.added.tokens == 30  # keys 10..19; 6..9 were a's
    store = erstore.open(tmp_path / "s")
    assert len(store) == store.manifest.totals.sequences == 20 and verify(store).ok
