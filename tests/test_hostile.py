"""Hand-made hostile and damaged stores: every reader raises CorruptStoreError, within bounds.

Each case starts from a fresh copy of one small real store (int8 codec: states, scales,
codec.json; several builds' worth of files) and changes it the way a broken disk or a hostile
colleague would. Most cases then re-record the changed files in the version manifest and re-seal
it ("consistent" damage), so that the structural checks, not only the checksums, are exercised.
Every reader is tried: `erstore.open` + `read` (TensorStore), the document map, the fork-safe
`LocalReader`, `verify`, and `gc` where paths matter. The dangerous cases run in a subprocess
under an address-space limit (RLIMIT_AS), so a regression fails the test instead of taking
pytest down; all run under a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import erstore
from erstore.codecs import Int8Codec
from erstore.errors import CorruptStoreError
from erstore.integrity import seal
from erstore.keys import key_for_ids
from erstore.manifest import Recipe, decode_index, encode_index
from erstore.validate import file_record
from erstore.writer import StoreWriter

D = 32
MEMORY_LIMIT = 3 << 30  # far below what the hostile sizes would allocate (5 GB .. 1 TB)


def make_store(path: Path, *, seed: int = 0, n: int = 12) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """A small int8 store with document maps; returns key -> (states, token ids, boundary) as read."""
    rng = np.random.default_rng(seed)
    recipe = Recipe(model_fingerprint="f" * 8, layer=1, tokenizer_fingerprint="t" * 8, max_length=64, stride=0,
                    codec=Int8Codec("both").to_dict(), hidden_size=D, num_layers=2)
    with StoreWriter(path, recipe) as w:
        for i in range(n):
            length = int(rng.integers(3, 40))
            ids = [i, *rng.integers(0, 30000, size=length - 1).tolist()]
            key = key_for_ids(ids, boundaries=(2,) if i % 3 == 0 else ())
            w.append(key, rng.standard_normal((length, D)).astype(np.float32), np.asarray(ids),
                     boundary=2 if i % 3 == 0 else 0)
            w.add_document(f"doc{i}", [key])
        w.commit()
    with erstore.open(path) as store:
        return {e.key: (e.states, e.token_ids, e.boundary) for e in store.read(list(store))}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "store"
    make_store(path)
    return path


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


# -- ways to damage a store ------------------------------------------------------------------
def manifest_path(root: Path) -> Path:
    return max((root / "versions").glob("*.json"))


def reseal(root: Path, **changes) -> None:
    """Re-record every file of the manifest (as it now is on disk) and re-seal it: consistent damage."""
    path = manifest_path(root)
    data = json.loads(path.read_text())
    for relpath in list(data["files"]):
        if (root / relpath).is_file() and not (root / relpath).is_symlink():
            data["files"][relpath] = file_record((root / relpath).read_bytes())
    data.update(changes)
    path.write_bytes(seal(data))


def one(root: Path, pattern: str) -> Path:
    (found,) = sorted(root.glob(pattern))
    return found


def edit_index(root: Path, edit) -> None:
    path = one(root, "index/*.idx")
    records, arrays = decode_index(path.read_bytes(), "idx")
    records = records.copy()
    arrays = edit(records, arrays) or arrays
    path.write_bytes(encode_index(records, arrays))
    reseal(root)


def edit_json(path: Path, edit, *, sealed: bool = False) -> None:
    data = json.loads(path.read_text())
    data = edit(data) or data
    path.write_bytes(seal(data) if sealed else json.dumps(data).encode())


def record_length(root):
    def edit(records, arrays):
        records["length"][0] = 2**32 - 1
    edit_index(root, edit)


def record_length_consistent(root):
    """Length 2**32-1 with the manifest's counts made to agree: the record bound must catch it."""
    record_length(root)
    m = json.loads(manifest_path(root).read_text())
    records, _ = decode_index(one(root, "index/*.idx").read_bytes(), "idx")
    tokens = int(records["length"].astype(np.int64).sum())
    reseal(root, totals={**m["totals"], "tokens": tokens}, added={**m["added"], "tokens": tokens})


def record_row_beyond(root):
    def edit(records, arrays):
        records["row"][0] = 2**40 - 5
    edit_index(root, edit)


def record_boundary(root):
    def edit(records, arrays):
        records["boundary"][1] = records["length"][1] + 7
    edit_index(root, edit)


def array_path(target):
    def damage(root):
        edit_index(root, lambda records, arrays: [target])
    return damage


def index_header_length(root):
    path = one(root, "index/*.idx")
    raw = bytearray(path.read_bytes())
    raw[12:16] = (2**32 - 1).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    reseal(root)


def index_count(root):
    path = one(root, "index/*.idx")
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[12:16], "little")
    header = json.loads(raw[16 : 16 + header_len])
    header["count"] = 2**60
    new = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(raw[:12] + len(new).to_bytes(4, "little") + new + raw[16 + header_len :])
    reseal(root)


def zarr_chunk_shape(root):
    path = one(root, "arrays/*/states/zarr.json")
    edit_json(path, lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[40_000_000, D]))
    reseal(root)


def zarr_dtype(root):
    edit_json(one(root, "arrays/*/scales/zarr.json"), lambda m: m.update(data_type="float64"))
    reseal(root)


def zarr_no_checksum(root):
    edit_json(one(root, "arrays/*/tokens/zarr.json"),
              lambda m: [c["configuration"].update(checksum=False) for c in m["codecs"] if c["name"] == "zstd"])
    reseal(root)


def zarr_unrecorded(root):
    edit_json(one(root, "arrays/*/tokens/zarr.json"), lambda m: m.update(fill_value=7))


def huge_codec_json(root):
    path = one(root, "arrays/*/codec.json")
    params = json.loads(path.read_text())
    params["padding"] = "x" * (24 << 20)
    path.write_text(json.dumps(params))
    reseal(root)


def codec_json_values(root):
    edit_json(one(root, "arrays/*/codec.json"), lambda p: p.update(channel_scale=[-1.0] * D))
    reseal(root)


def huge_manifest(root):
    with open(manifest_path(root), "ab") as f:
        f.truncate(300 << 20)  # sparse: the size is what a reader must refuse before reading


def huge_store_file(root):
    with open(root / "erstore.json", "ab") as f:
        f.truncate(2 << 20)


def recipe_hidden_size(root):
    edit_json(root / "erstore.json", lambda m: m["recipe"].update(hidden_size=2**40), sealed=True)


def manifest_index_name(root):
    reseal(root, indexes=["../../outside"])


def manifest_counts(root):
    m = json.loads(manifest_path(root).read_text())
    reseal(root, totals={**m["totals"], "sequences": m["totals"]["sequences"] + 1})


def manifest_type(root):
    reseal(root, version="one")


def docs_structure(root):
    path = one(root, "index/*.docs.json")
    path.write_text(json.dumps({"doc0": "not a list"}))
    reseal(root)


def docs_unsealed(root):
    path = one(root, "index/*.docs.json")
    docs = json.loads(path.read_text())
    docs["doc0"], docs["doc1"] = docs["doc1"], docs["doc0"]  # swapped windows, still valid JSON
    path.write_text(json.dumps(docs, sort_keys=True))


def chunk_truncated(root):
    path = one(root, "arrays/*/states/c/0/0")
    path.write_bytes(path.read_bytes()[:-9])


def chunk_missing(root):
    one(root, "arrays/*/scales/c/0/0").unlink()


def chunk_bomb(root):
    import zstandard

    path = one(root, "arrays/*/tokens/c/0")
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(1 << 30)) + b"\0\0\0\0")


def symlink_array(root):
    outside = root.parent / "outside-arrays"
    states = one(root, "arrays/*/states")
    shutil.copytree(states, outside)
    shutil.rmtree(states)
    states.symlink_to(outside, target_is_directory=True)


def symlink_chunk(root):
    outside = root.parent / "outside-chunk"
    chunk = one(root, "arrays/*/tokens/c/0")
    shutil.copy(chunk, outside)
    chunk.unlink()
    chunk.symlink_to(outside)


def symlink_store_file(root):
    outside = root.parent / "outside-erstore.json"
    shutil.copy(root / "erstore.json", outside)
    (root / "erstore.json").unlink()
    (root / "erstore.json").symlink_to(outside)


CASES = {
    "record length 2**32-1": record_length,
    "record length 2**32-1, counts agree": record_length_consistent,
    "record row beyond the arrays": record_row_beyond,
    "pair boundary beyond its sequence": record_boundary,
    "array path ../../other/arr": array_path("../../other/arr"),
    "absolute array path": array_path("/etc"),
    "index header length 2**32-1": index_header_length,
    "index record count 2**60": index_count,
    "zarr.json chunk shape 40M rows": zarr_chunk_shape,
    "zarr.json dtype float64": zarr_dtype,
    "zarr.json without chunk checksums": zarr_no_checksum,
    "zarr.json changed, not recorded": zarr_unrecorded,
    "codec.json of 24 MB": huge_codec_json,
    "codec.json negative scales": codec_json_values,
    "manifest of 300 MB": huge_manifest,
    "erstore.json of 2 MB": huge_store_file,
    "recipe hidden size 2**40": recipe_hidden_size,
    "manifest index name ../../outside": manifest_index_name,
    "manifest counts disagree": manifest_counts,
    "manifest version not a number": manifest_type,
    "document map not lists": docs_structure,
    "document windows swapped": docs_unsealed,
    "chunk truncated": chunk_truncated,
    "chunk missing": chunk_missing,
    "chunk decompressing to 1 GiB": chunk_bomb,
    "array folder symlinked outside": symlink_array,
    "chunk symlinked outside": symlink_chunk,
    "erstore.json symlinked outside": symlink_store_file,
}

# Damage to one build's arrays is found when they are first read (the document map never opens
# them); damage to the document map only by what reads it. Everything else fails every reader.
ARRAY_CASES = {name for name in CASES if name.startswith(("zarr.json", "codec.json", "chunk", "array folder"))}
DOCUMENT_CASES = {"document map not lists", "document windows swapped"}
ALL_READERS = {"read", "windows", "localread", "verify", "loader"}


def affected(case: str) -> set[str]:
    if case in ARRAY_CASES:
        return ALL_READERS - {"windows"}
    if case in DOCUMENT_CASES:
        return {"windows", "verify"}
    return ALL_READERS


# What every case runs, in a fresh interpreter with an address-space limit. Prints one line per
# reader: "<reader> <exception class> <message>" or "<reader> ok".
READERS = textwrap.dedent('''
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    import numpy as np
    import erstore
    from erstore.localread import LocalReader
    from erstore.verify import verify

    path = sys.argv[1]
    def attempt(name, fn):
        try:
            fn()
            print(name, "ok", flush=True)
        except Exception as e:
            print(name, type(e).__name__, str(e).replace("\\n", " ")[:3000], flush=True)

    def tensorstore():
        with erstore.open(path) as store:
            store.read(list(store))
    def documents():
        with erstore.open(path) as store:
            store.windows("doc0")
    def local():
        store = erstore.open(path)
        LocalReader(path, store.index, store.codec, store.recipe.hidden_size).read_positions(np.arange(len(store)))
    def verified():
        report = verify(erstore.open(path))
        if not report.ok:
            raise erstore.CorruptStoreError(report.corrupt[0]["problem"])
    def dataset():
        with erstore.open(path) as store, store.loader(batch_size=4) as loader:
            for _ in loader:
                pass
    for name, fn in [("read", tensorstore), ("windows", documents), ("localread", local), ("verify", verified),
                     ("loader", dataset)]:
        attempt(name, fn)
''')


def run_readers(path: Path) -> dict[str, str]:
    script = READERS.format(limit=MEMORY_LIMIT)
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert proc.returncode == 0, f"readers crashed ({proc.returncode}): {proc.stdout}\n{proc.stderr[-3000:]}"
    out = {}
    for line in proc.stdout.splitlines():
        name, _, rest = line.partition(" ")
        out[name] = rest
    return out


def outside_snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in root.parent.rglob("*")
            if p.is_file() and root not in p.parents}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_store_raises_corrupt_store_error(store, case):
    CASES[case](store)
    before = outside_snapshot(store)
    results = run_readers(store)
    assert set(results) == {"read", "windows", "localread", "verify", "loader"}, results
    for reader, result in results.items():
        if reader not in affected(case):
            assert result == "ok", (case, reader, result)  # that reader never touches the damaged file
            continue
        assert result.startswith("CorruptStoreError"), (case, reader, result)
        assert "erstore verify" in result or reader == "verify", (case, reader, result)
    assert outside_snapshot(store) == before  # nothing outside the store written or deleted


@pytest.mark.parametrize("case", ["array folder symlinked outside", "chunk symlinked outside",
                                  "array path ../../other/arr"])
def test_gc_refuses_to_follow_paths_out_of_the_store(store, case):
    from erstore.manage import gc

    CASES[case](store)
    before = outside_snapshot(store)
    with pytest.raises(CorruptStoreError):
        gc(str(store), grace_hours=0)
    assert outside_snapshot(store) == before


def test_gc_ignores_hostile_key_names(store):
    """A key like `arrays/../x` listed by the kvstore never becomes a build to delete."""
    from erstore.location import Location
    from erstore.manage import _builds

    (store / "journal" / "..x").mkdir(parents=True)
    (store / "journal" / "..x" / "0.idx").write_bytes(b"")
    assert all(".." != b and "/" not in b for b in _builds(Location.open(str(store))))


# -- random byte flips -------------------------------------------------------------------------
def read_everything(path: Path) -> tuple[dict, dict]:
    """What every in-process reader returns: entries (TensorStore and LocalReader must agree), docs."""
    from erstore.localread import LocalReader
    from erstore.verify import verify

    with erstore.open(path) as store:
        entries = {e.key: (e.states, e.token_ids, e.boundary) for e in store.read(list(store))}
        local = LocalReader(path, store.index, store.codec, store.recipe.hidden_size)
        for e in local.read_positions(np.arange(len(store))):
            assert same(entries[e.key], (e.states, e.token_ids, e.boundary))
        docs = {d: store.windows(d) for d in store.documents()}
        report = verify(store)
        if not report.ok:
            raise CorruptStoreError(report.corrupt[0]["problem"])
    return entries, docs


def same(a, b) -> bool:
    return a[0].tobytes() == b[0].tobytes() and a[1].tolist() == b[1].tolist() and a[2] == b[2]


class Original(tuple):
    """(entries, docs, files with sizes) of the pristine store; a short repr for failure reports."""

    def __repr__(self) -> str:
        return f"<pristine store: {len(self[0])} entries, {len(self[2])} files>"


@pytest.fixture(scope="module")
def original(pristine):
    files = sorted((str(p.relative_to(pristine)), p.stat().st_size) for p in pristine.rglob("*") if p.is_file())
    return Original((*read_everything(pristine), files))


@settings(max_examples=int(os.environ.get("ERSTORE_FLIP_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(which=st.integers(0, 2**16), position=st.integers(0, 2**32 - 1), mask=st.integers(1, 255))
def test_no_byte_flip_changes_what_a_read_returns(pristine, original, tmp_path, which, position, mask):
    """Flip one byte of any file of a fresh store: every read either raises CorruptStoreError or
    returns exactly the original entries and document windows."""
    want_entries, want_docs, files = original
    # Chosen by index and position modulo sizes: build ids (hence names and order) differ per session.
    relpath, size = files[which % len(files)]
    offset = position % size
    copy = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        shutil.copytree(pristine, copy / "s")
        target = copy / "s" / relpath
        raw = bytearray(target.read_bytes())
        raw[offset] ^= mask
        target.write_bytes(bytes(raw))
        try:
            entries, docs = read_everything(copy / "s")
        except CorruptStoreError:
            return
        assert entries.keys() == want_entries.keys(), relpath
        assert all(same(entries[k], want_entries[k]) for k in entries), relpath
        assert docs == want_docs, relpath
    finally:
        shutil.rmtree(copy)
