"""Exporting a store version to plain files (Parquet, safetensors, npz) or a `datasets.Dataset`.

Every exported sequence carries its key, token ids (int32 [n]), pair boundary and decoded hidden
states ([n, d]: float16/float32 as stored by lossless codecs, float32 for bfloat16 and lossy
codecs, since none of the target formats has bfloat16 everywhere). Reads go in batches of about
`batch_bytes` (16 MB) of decoded states and each batch is written before the next is read, so
memory stays bounded by the batch (plus one safetensors shard). Output is written to a `.partial` path
and renamed at the end: an interrupted export leaves nothing that looks finished.

Layouts (also in docs/format.md):
- parquet: one file, one row per sequence: key (string), token_ids (list<int32>), boundary
  (int32), states (list<fixed_size_list<float, d>>); one row group per batch.
- safetensors: a folder of shards `part-00000.safetensors`, ... with tensors `states/<key>` and
  `token_ids/<key>`; each shard's metadata holds `boundaries` (JSON key -> boundary) and `recipe`.
- npz: one file with arrays `states/<key>`, `token_ids/<key>`, then `keys` and `boundaries`
  (`np.load(path)["states/" + key]`), each entry streamed into the zip.

Not here: exporting codec parts undecoded (see `Store.start_read(...).raw_result()`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erstore import progress as _progress
from erstore.errors import InvalidInputError, KeyNotFoundError
from erstore.store import Entry, Store

FORMATS = ("parquet", "safetensors", "npz")
# Parquet's writer needs ~5x a batch while encoding nested lists (levels, pages): 16 MB batches
# keep its peak near 80 MB (64 MB batches: 300 MB) at the same speed.
BATCH_BYTES = 16 << 20
SHARD_BYTES = 256 << 20
# Export reads every chunk once, in order: a big TensorStore cache would only hold memory.
CACHE_BYTES = 16 << 20


@dataclass(frozen=True)
class ExportResult:
    path: str
    format: str
    version: int | None
    sequences: int
    tokens: int
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def positions(store: Store, keys: Sequence[str] | None) -> np.ndarray:
    """Index positions of `keys` (all sequences in commit order if None); unknown keys raise."""
    if keys is None:
        return np.arange(len(store), dtype=np.int64)
    keys = list(keys)
    found = store.index.find(keys)
    missing = [k for k, p in zip(keys, found) if p < 0]
    if missing:
        raise KeyNotFoundError(f"{len(missing)} requested key(s) are not in {store.location.url} version "
                               f"{store.version}, e.g. {missing[0]}; check the --keys file or the version")
    return found


def batches(store: Store, keys: Sequence[str] | None = None, *, batch_bytes: int = BATCH_BYTES,
            phase: _progress.Phase | None = None) -> Iterator[list[Entry]]:
    """Decoded entries in batches of about `batch_bytes` of float32 states (at least one sequence).

    `phase` counts each batch's sequences once the consumer has handled it (asks for the next).
    """
    pos = positions(store, keys)
    lengths = store.index.records["length"][pos].astype(np.int64)
    row_bytes = 4 * store.recipe.hidden_size
    start = 0
    while start < len(pos):
        cum = np.cumsum(lengths[start:] * row_bytes)
        stop = start + max(1, int(np.searchsorted(cum, batch_bytes, side="right")))
        yield store.read_positions(pos[start:stop])
        if phase is not None:
            phase.update(stop - start)
        start = stop


def plain(states: np.ndarray) -> np.ndarray:
    """States as a dtype every target format has: float16/float32 kept, anything else float32."""
    return states if states.dtype in (np.float16, np.float32) else states.astype(np.float32)


def export(store: Store | str | os.PathLike[str], out: str | os.PathLike[str], *, format: str,
           version: int | str | None = None, keys: Sequence[str] | None = None, overwrite: bool = False,
           batch_bytes: int = BATCH_BYTES, shard_bytes: int = SHARD_BYTES, progress: bool | str = True,
           **location_options: Any) -> ExportResult:
    """Write `keys` (default: every sequence) of a store version to `out` as `format`.

    `store` is an open Store or a path/URL (then `version` and location options apply).
    `progress` (True or a mode of `erstore.progress`) reports the sequences written on stderr.
    Raises InvalidInputError for an unknown format or an existing `out` (unless `overwrite`),
    KeyNotFoundError for keys the version lacks.

        erstore.export.export("stores/minilm-l3", "l3.parquet", format="parquet")
    """
    if format not in FORMATS:
        raise InvalidInputError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    target = Path(out)
    if target.exists() and not overwrite:
        raise InvalidInputError(f"{target} already exists; choose another output path or pass overwrite")
    owned = not isinstance(store, Store)
    opened = Store(store, version=version, cache_bytes=CACHE_BYTES, **location_options) if owned else store
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        total = len(positions(opened, keys))  # unknown keys fail before anything is written
        writer = {"parquet": _parquet, "safetensors": _safetensors, "npz": _npz}[format]
        with _progress.reporter("export", progress).phase(format, total=total, unit="sequences") as phase:
            sequences, tokens, files = writer(opened, keys, partial, batch_bytes=batch_bytes,
                                              shard_bytes=shard_bytes, phase=phase)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(partial, target)
    except BaseException:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise
    finally:
        if owned:
            opened.close()
    files = [str(target / f) for f in files] if format == "safetensors" else [str(target)]
    return ExportResult(str(target), format, opened.version, sequences, tokens, tuple(files))


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise InvalidInputError("exporting Parquet needs pyarrow; pip install 'erstore[formats]'") from e
    return pyarrow


def arrow_batch(entries: list[Entry], hidden_size: int) -> Any:
    """One Arrow record batch of entries (states as list<fixed_size_list<float, d>>)."""
    pa = _pyarrow()
    states = [plain(e.states) for e in entries]
    dtype = np.result_type(*[s.dtype for s in states]) if states else np.float32
    flat = np.concatenate([s.reshape(-1) for s in states]).astype(dtype, copy=False)
    lengths = np.array([len(e.token_ids) for e in entries], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    rows = pa.FixedSizeListArray.from_arrays(pa.array(flat), hidden_size)
    tokens = np.concatenate([np.asarray(e.token_ids, dtype=np.int32) for e in entries])
    return pa.record_batch({
        "key": pa.array([e.key for e in entries], pa.string()),
        "token_ids": pa.ListArray.from_arrays(offsets, pa.array(tokens)),
        "boundary": pa.array([e.boundary for e in entries], pa.int32()),
        "states": pa.ListArray.from_arrays(offsets, rows),
    })


def _parquet(store: Store, keys: Any, path: Path, *, batch_bytes: int, phase: _progress.Phase,
             **_: Any) -> tuple[int, int, list[str]]:
    pq = _pyarrow().parquet
    writer, n, tokens = None, 0, 0
    meta = {b"erstore": json.dumps({"recipe": store.recipe.to_dict(), "version": store.version}).encode()}
    try:
        for entries in batches(store, keys, batch_bytes=batch_bytes, phase=phase):
            batch = arrow_batch(entries, store.recipe.hidden_size)
            if writer is None:
                writer = _parquet_writer(pq, path, batch.schema.with_metadata(meta))
            writer.write_batch(batch)
            n, tokens = n + len(entries), tokens + sum(len(e.token_ids) for e in entries)
            del batch
            _pyarrow().default_memory_pool().release_unused()  # else the pool keeps every batch's pages
        if writer is None:  # no sequences: an empty file with the schema
            writer = _parquet_writer(pq, path, arrow_batch_schema(store.recipe.hidden_size).with_metadata(meta))
    finally:
        if writer is not None:
            writer.close()
    return n, tokens, [path.name]


def _parquet_writer(pq: Any, path: Path, schema: Any) -> Any:
    # Unique keys and float states neither dictionary-encode nor profit from min/max statistics:
    # both would cost time and memory per row group for nothing.
    return pq.ParquetWriter(path, schema, use_dictionary=False, write_statistics=["key", "boundary"])


def arrow_batch_schema(hidden_size: int) -> Any:
    pa = _pyarrow()
    return pa.schema([("key", pa.string()), ("token_ids", pa.list_(pa.int32())), ("boundary", pa.int32()),
                      ("states", pa.list_(pa.list_(pa.float32(), hidden_size)))])


def _safetensors(store: Store, keys: Any, path: Path, *, batch_bytes: int, shard_bytes: int,
                 phase: _progress.Phase, **_: Any) -> tuple[int, int, list[str]]:
    from safetensors.numpy import save_file

    path.mkdir()
    files: list[str] = []
    shard: dict[str, np.ndarray] = {}
    bounds: dict[str, int] = {}
    size = n = tokens = 0

    def flush() -> None:
        nonlocal shard, bounds, size
        if shard:
            name = f"part-{len(files):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"boundaries": json.dumps(bounds),
                                                         "recipe": json.dumps(store.recipe.to_dict())})
            files.append(name)
        shard, bounds, size = {}, {}, 0

    for entries in batches(store, keys, batch_bytes=batch_bytes, phase=phase):
        for e in entries:
            shard[f"states/{e.key}"] = np.ascontiguousarray(plain(e.states))
            shard[f"token_ids/{e.key}"] = np.ascontiguousarray(e.token_ids, dtype=np.int32)
            bounds[e.key] = int(e.boundary)
            size += shard[f"states/{e.key}"].nbytes
            n, tokens = n + 1, tokens + len(e.token_ids)
        if size >= shard_bytes:
            flush()
    flush()
    return n, tokens, files


def _npz(store: Store, keys: Any, path: Path, *, batch_bytes: int, phase: _progress.Phase,
         **_: Any) -> tuple[int, int, list[str]]:
    names: list[str] = []
    bounds: list[int] = []
    tokens = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        def put(name: str, array: np.ndarray) -> None:
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

        for entries in batches(store, keys, batch_bytes=batch_bytes, phase=phase):
            for e in entries:
                put(f"states/{e.key}", plain(e.states))
                put(f"token_ids/{e.key}", np.asarray(e.token_ids, dtype=np.int32))
                names.append(e.key)
                bounds.append(int(e.boundary))
                tokens += len(e.token_ids)
        put("keys", np.array(names, dtype=np.str_))
        put("boundaries", np.array(bounds, dtype=np.int32))
    return len(names), tokens, [path.name]


def to_hf_dataset(store: Store, keys: Sequence[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
                  batch_bytes: int = BATCH_BYTES, progress: bool | str = True) -> Any:
    """A `datasets.Dataset` of `keys` (default all): key, token_ids, boundary, states [n, d].

    The rows are streamed into one Arrow file (the Parquet export's schema) under `cache_dir`
    (default: datasets' cache, folder `erstore`) and memory-mapped, not held in memory. A store
    version never changes, so the file is named by store, version and keys and reused when present.
    Needs `datasets` (pip install 'erstore[formats]'). `.with_format("numpy")` gives states as [n, d].
    Writing the file reports progress on stderr (`progress`: True or a mode of `erstore.progress`).
    """
    try:
        import datasets
    except ImportError as e:
        raise InvalidInputError("store.to_hf_dataset needs datasets; pip install 'erstore[formats]'") from e
    import xxhash

    pa = _pyarrow()
    wanted = None if keys is None else list(keys)
    total = len(positions(store, wanted))
    folder = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "erstore"
    h = xxhash.xxh3_128(json.dumps([store.location.url, store.version, store.recipe.to_dict()]).encode())
    for k in wanted or ():
        h.update(k.encode())
    path = folder / f"{h.hexdigest()}{'-all' if wanted is None else ''}.arrow"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            schema = arrow_batch_schema(store.recipe.hidden_size)
            writer = None
            with _progress.reporter("to_hf_dataset", progress).phase("arrow", total=total, unit="sequences") as phase:
                for entries in batches(store, wanted, batch_bytes=batch_bytes, phase=phase):
                    batch = arrow_batch([Entry(e.key, plain(e.states).astype(np.float32, copy=False), e.token_ids,
                                               e.boundary) for e in entries], store.recipe.hidden_size)
                    if writer is None:
                        writer = pa.ipc.new_stream(str(partial), batch.schema)
                    writer.write_batch(batch)
            if writer is None:
                writer = pa.ipc.new_stream(str(partial), schema)
            writer.close()
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return datasets.Dataset.from_file(str(path))
