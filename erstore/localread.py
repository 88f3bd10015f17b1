"""A TensorStore-free reader of a local store's arrays, for processes forked after TensorStore ran.

TensorStore 0.1.86 registers a fork handler and aborts the child on its next call ("fork() use
detected"), even for handles opened fresh in the child. `torch.utils.data.DataLoader` workers
are forked by default, so a dataset that opened its store in the parent cannot use TensorStore
in its workers at all. For local stores this module reads the same zarr3 chunks directly (file
read + zstd via `zstandard`), with a small LRU cache of decoded chunks, and returns the same
`Entry` objects as `Store.read_positions`.

Scope: only what erstore writes (zarr3, regular chunk grid, default chunk keys, [transpose +]
bytes + zstd [with its content checksum]), decoded by the store's codec. Every read is checked:
array metadata must be what the codec writes (and match the manifest's checksums), paths stay
inside the store (no `..`, no symlinks out), and each sequence's bytes must match the xxh3
checksum its index record carries; damage raises CorruptStoreError.
Not here: object storage or HTTP (use a spawn/forkserver DataLoader or `erstore.torchdata.Loader`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from erstore.codecs import Codec, load_params, storage_dtype
from erstore.errors import CorruptStoreError
from erstore.index import KeyIndex
from erstore.integrity import check_name, confined, damaged, refuse_symlinks_out
from erstore.keys import join_key
from erstore.store import Entry
from erstore.validate import array_metadata, codec_json_cap, read_error

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


def _read_file(path: Path, limit: int) -> bytes | None:
    """A file's bytes without following a symlink at its last component (None if absent)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise damaged(str(path), f"cannot be opened ({e.strerror}; a symlink?)") from e
    with os.fdopen(fd, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise damaged(str(path), f"is more than the {limit} bytes it can need")
    return raw


class _Array:
    """One zarr3 array on local disk: chunk shape, dtype, and chunk decoding.

    Its zarr.json must be exactly what the codec writes (and match the manifest's checksum), so
    chunk shapes and sizes below come from erstore's own metadata, never from the store.
    """

    def __init__(self, root: Path, relpath: str, codec: Codec, hidden_size: int, name: str,
                 manifest: Any, verified: bool):
        self.root = confined(root, relpath, f"{root}/{relpath}")
        where = f"{self.root}/zarr.json"
        raw = _read_file(self.root / "zarr.json", 1 << 20)
        record = manifest.file(f"{relpath}/zarr.json") if manifest is not None else None
        if record is not None:
            from erstore.integrity import check_digest

            check_digest(raw or b"", record["xxh3_64"], where)
        elif verified:
            raise damaged(where, "is not recorded in the version manifest")
        meta, self.checked = array_metadata(raw, codec, hidden_size, name, where, verified=verified)
        codecs = meta["codecs"]
        self.order: list[int] | None = None
        if codecs[0]["name"] == "transpose":
            self.order = list(codecs[0]["configuration"]["order"])
        self.chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = storage_dtype(meta["data_type"]).newbyteorder("<")
        self.size = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self.suffix = "/0" * (len(self.chunk_shape) - 1)

    def chunk(self, c: int) -> np.ndarray:
        import zstandard

        path = self.root / "c" / f"{c}{self.suffix}"
        raw = _read_file(path, self.size + (1 << 20))
        if raw is None:
            if self.checked:  # erstore stores every chunk it wrote, fill-valued ones included
                raise CorruptStoreError(f"chunk {path} is missing: the store is damaged; run `erstore verify`")
            return np.zeros(self.chunk_shape, dtype=self.dtype)
        try:  # libzstd checks the frame's content checksum, when it has one, as it decodes
            out = zstandard.ZstdDecompressor().decompress(raw, max_output_size=self.size)
        except zstandard.ZstdError as e:
            raise CorruptStoreError(f"chunk {path} cannot be decoded ({e}): the store is damaged; "
                                    "run `erstore verify`") from e
        if len(out) != self.size:
            raise CorruptStoreError(f"chunk {path} decodes to {len(out)} bytes, not {self.size}: the store is "
                                    "damaged; run `erstore verify`")
        data = np.frombuffer(out, dtype=self.dtype)
        if self.order is None:
            return data.reshape(self.chunk_shape)
        # The `transpose` codec stored the chunk as chunk.transpose(order); undo it.
        stored = data.reshape([self.chunk_shape[i] for i in self.order])
        return np.ascontiguousarray(stored.transpose(np.argsort(self.order)))


class LocalReader:
    """Reads sequences of a local store by index position, without TensorStore."""

    def __init__(self, root: str | Path, index: KeyIndex, codec: Codec, hidden_size: int, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.root = Path(root)
        self.index = index
        self.codec = codec
        self.hidden_size = hidden_size
        self.parts = list(codec.arrays(hidden_size))
        self._codec_params: dict[int, dict] = {}
        self.cache_bytes = cache_bytes
        self._arrays: dict[tuple[int, str], _Array] = {}
        self._cache: OrderedDict[tuple[int, str, int], np.ndarray] = OrderedDict()
        self._cached = 0

    def _array(self, slot: int, name: str) -> _Array:
        arr = self._arrays.get((slot, name))
        if arr is None:
            build = check_name(self.index.arrays[slot], str(self.root), "array")
            if not any(s == slot for s, _ in self._arrays):  # first array of this build: one scan
                refuse_symlinks_out(self.root, f"arrays/{build}", f"{self.root}/arrays/{build}")
            arr = _Array(self.root, f"arrays/{build}/{name}", self.codec, self.hidden_size, name,
                         self.index.manifest, self.index.verified)
            self._arrays[(slot, name)] = arr
        return arr

    def _rows(self, slot: int, name: str, start: int, stop: int) -> np.ndarray:
        arr = self._array(slot, name)
        height = arr.chunk_shape[0]
        parts = []
        for c in range(start // height, (stop - 1) // height + 1):
            chunk = self._cache.get((slot, name, c))
            if chunk is None:
                chunk = arr.chunk(c)
                self._cache[(slot, name, c)] = chunk
                self._cached += chunk.nbytes
                while self._cached > self.cache_bytes and len(self._cache) > 1:
                    self._cached -= self._cache.popitem(last=False)[1].nbytes
            else:
                self._cache.move_to_end((slot, name, c))
            lo, hi = max(start, c * height) - c * height, min(stop, (c + 1) * height) - c * height
            parts.append(chunk[lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_positions(self, positions: np.ndarray, *, keys: list[str] | None = None) -> list[Entry]:
        """Same result as `Store.read_positions`: entries in the order asked."""
        recs = self.index.records[np.asarray(positions, dtype=np.int64)]
        if keys is None:
            keys = [join_key(hi, lo) for hi, lo in zip(recs["hi"].tolist(), recs["lo"].tolist())]
        from erstore.writer import checksum

        out = []
        for key, rec in zip(keys, recs):
            slot, start = int(rec["array"]), int(rec["row"])
            stop = start + int(rec["length"])
            parts = {name: self._rows(slot, name, start, stop) for name in self.parts}
            tokens = self._rows(slot, "tokens", start, stop)
            # Also the sequence's own xxh3 (recorded at write time, what `verify` checks): it covers
            # exactly the bytes returned (format-1 chunks have no checksum), at ~18 GB/s.
            if checksum(parts, tokens) != int(rec["checksum"]):
                where = f"{self.root}/arrays/{self.index.arrays[slot]} rows {start}..{stop}"
                raise read_error(where, key, str(self.root), ValueError("DATA_LOSS: sequence checksum mismatch"))
            states = self.codec.decode(parts, self._params(slot))
            out.append(Entry(key, states, tokens, int(rec["boundary"])))
        return out

    def _params(self, slot: int) -> dict:
        params = self._codec_params.get(slot)
        if params is None:
            relpath = f"arrays/{check_name(self.index.arrays[slot], str(self.root), 'array')}/codec.json"
            path = confined(self.root, relpath, f"{self.root}/{relpath}")
            raw = _read_file(path, codec_json_cap(self.hidden_size))
            manifest = self.index.manifest
            record = manifest.file(relpath) if manifest is not None else None
            if record is not None:
                from erstore.integrity import check_digest

                check_digest(raw or b"", record["xxh3_64"], str(path))
            elif self.index.verified and raw is not None:
                raise damaged(str(path), "is not recorded in the version manifest")
            params = load_params(raw, self.codec, self.hidden_size, str(path))
            self._codec_params[slot] = params
        return params
