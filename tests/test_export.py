"""erstore export / store.to_hf_dataset: every sequence comes out exactly as store.get returns it;
arrays carry their real row count; docs/format.md is enough to read a store with plain zarr."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import erstore
from erstore.cli import main
from erstore.export import batches, export

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "format.md"


def expected(store_path, keys=None):
    with erstore.open(store_path) as s:
        keys = list(s) if keys is None else keys
        return [(e.key, e.states, e.token_ids, e.boundary) for e in s.read(keys)]


def exported(fmt, path):
    """(key, states, token ids, boundary) per sequence, read back with the format's own library."""
    if fmt == "parquet":
        t = pq.read_table(path).combine_chunks()
        states = t.column("states").chunk(0)
        d = states.type.value_type.list_size
        return [(t.column("key")[i].as_py(), states[i].values.flatten().to_numpy().reshape(-1, d),
                 t.column("token_ids")[i].values.to_numpy(), t.column("boundary")[i].as_py())
                for i in range(t.num_rows)]
    if fmt == "npz":
        z = np.load(path)
        return [(k, z[f"states/{k}"], z[f"token_ids/{k}"], int(b)) for k, b in zip(z["keys"], z["boundaries"])]
    from safetensors import safe_open

    out = []
    for shard in sorted(Path(path).glob("part-*.safetensors")):
        with safe_open(str(shard), "np") as f:
            bounds = json.loads(f.metadata()["boundaries"])
            out += [(k, f.get_tensor(f"states/{k}"), f.get_tensor(f"token_ids/{k}"), bounds[k]) for k in bounds]
    return out


def same(got, want):
    assert [g[0] for g in got] == [w[0] for w in want]
    for (k, s, t, b), (_, s2, t2, b2) in zip(got, want):
        assert s.dtype == s2.dtype and np.array_equal(s, s2), k
        assert np.array_equal(t, t2) and b == b2, k


@pytest.mark.parametrize("fmt", ["parquet", "safetensors", "npz"])
def test_export_equals_store_reads(qa_store, read_store, tmp_path, fmt):
    for store in (qa_store, read_store):  # pairs (boundaries) and a long multi-window document
        out = tmp_path / f"{store.parent.name}.{fmt}"
        # Tiny batches and shards: many reads and several safetensors files, same result.
        r = export(store, out, format=fmt, batch_bytes=20_000, shard_bytes=50_000)
        want = expected(store)
        same(exported(fmt, out), want)
        assert r.sequences == len(want) and r.tokens == sum(len(w[2]) for w in want)
        if fmt == "safetensors" and store is read_store:
            assert len(r.files) > 1
    assert not list(tmp_path.glob("*.partial"))


def test_export_batches_are_bounded(read_store):
    with erstore.open(read_store) as s:
        row = 4 * s.recipe.hidden_size
        sizes = [sum(len(e.token_ids) for e in b) * row for b in batches(s, batch_bytes=10_000)]
        longest = int(s.index.records["length"].max()) * row
        assert len(sizes) > 3 and max(sizes) <= max(10_000, longest)
        assert sum(sizes) == s.index.total_tokens * row


def test_cli_export_with_keys_and_errors(read_store, tmp_path):
    with erstore.open(read_store) as s:
        keys = list(s)[3:7]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    out = tmp_path / "sub.parquet"
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(read_store), "--format", "parquet", "--keys",
                                  str(tmp_path / "keys.txt"), "--out", str(out), "--version", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sequences"] == 4
    same(exported("parquet", out), expected(read_store, keys))
    again = runner.invoke(main, ["export", str(read_store), "--format", "parquet", "--out", str(out)])
    assert again.exit_code != 0 and "already exists" in again.output
    (tmp_path / "bad.txt").write_text("0" * 32 + "\n")
    bad = runner.invoke(main, ["export", str(read_store), "--format", "npz", "--keys", str(tmp_path / "bad.txt"),
                               "--out", str(tmp_path / "bad.npz")])
    assert bad.exit_code != 0 and "not in" in bad.output and "--keys" in bad.output
    assert not (tmp_path / "bad.npz").exists() and not list(tmp_path.glob("*.partial"))


def test_to_hf_dataset_for_a_key_subset(read_store, tmp_path):
    pytest.importorskip("datasets")
    with erstore.open(read_store) as s:
        keys = list(s)[::3]
        ds = s.to_hf_dataset(keys, cache_dir=tmp_path)
        assert ds.column_names == ["key", "token_ids", "boundary", "states"] and len(ds) == len(keys)
        rows = ds.with_format("numpy")
        for i, entry in enumerate(s.read(keys)):
            assert rows[i]["key"] == entry.key
            assert np.array_equal(rows[i]["states"], entry.states.astype(np.float32))
            assert np.array_equal(rows[i]["token_ids"], entry.token_ids)
        assert len(s.to_hf_dataset(keys, cache_dir=tmp_path)) == len(keys)  # cached file reused
        assert len(list(tmp_path.glob("*.arrow"))) == 1


def test_arrays_carry_their_real_row_count(read_store):
    with erstore.open(read_store) as s:
        rows = s.index.total_tokens
        [build] = s.index.arrays
    for name in ("states", "tokens"):
        meta = json.loads((read_store / "arrays" / build / name / "zarr.json").read_text())
        assert meta["shape"][0] == rows


def test_a_store_reads_with_only_zarr_and_numpy(read_store):
    """The example of docs/format.md, run as written on a real store, gives what store.get gives."""
    code = re.search(r"## Example: plain zarr \+ numpy\n\n```python\n(.*?)```", DOCS.read_text(), re.DOTALL).group(1)
    code = code.replace('root = "stores/minilm-l3/"', f'root = "{read_store}/"')
    scope: dict = {}
    exec(compile(code, str(DOCS), "exec"), scope)  # noqa: S102 (our own documentation)
    rec = scope["rec"]
    key = f"{int(rec['hi']):016x}{int(rec['lo']):016x}"
    with erstore.open(read_store) as s:
        states, tokens = s.get(key, with_token_ids=True)
    assert np.array_equal(scope["states"], states) and np.array_equal(scope["tokens"], tokens)
