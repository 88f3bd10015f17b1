"""A TensorStore-free reader of a local store's arrays, for processes forked after TensorStore ran.

TensorStore 0.1.86 registers a fork handler and aborts the child on its next call ("fork() use
detected"), even for handles opened fresh in the child. `torch.utils.data.DataLoader` workers
are forked by default, so a dataset that opened its store in the parent cannot use TensorStore
in its workers at all. For local stores this module reads the same zarr3 chunks directly (file
read + zstd via `zstandard`), with a small LRU cache of decoded chunks, and returns the same
`Entry` objects as `Store.read_positions`.

Scope: only what erstore writes (zarr3, regular chunk grid, default chunk keys, [transpose +]
bytes + zstd), decoded by the store's codec.
Not here: object storage or HTTP (use a spawn/forkserver DataLoader or `erstore.torchdata.Loader`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from erstore.codecs import Codec, load_params, storage_dtype
from erstore.errors import CorruptStoreError, ErstoreError
from erstore.index import KeyIndex
from erstore.keys import join_key
from erstore.store import Entry

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class _Array:
    """One zarr3 array on local disk: chunk shape, dtype, and chunk decoding."""

    def __init__(self, root: Path):
        self.root = root
        try:
            meta = json.loads((root / "zarr.json").read_text())
        except (OSError, ValueError) as e:
            raise CorruptStoreError(f"cannot read {root}/zarr.json: {e}") from e
        codecs = meta["codecs"]
        names = [c["name"] for c in codecs]
        self.order: list[int] | None = None
        if names and names[0] == "transpose":
            self.order = list(codecs[0]["configuration"]["order"])
            names = names[1:]
        encoding = meta.get("chunk_key_encoding", {})
        if names != ["bytes", "zstd"] or encoding.get("name") != "default" or \
                encoding.get("configuration", {}).get("separator", "/") != "/":
            raise ErstoreError(
                f"{root} uses codecs {names} / chunk keys {encoding}, which the fork-safe reader "
                "does not handle; use DataLoader(multiprocessing_context='spawn') instead"
            )
        self.chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = storage_dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        self.suffix = "/0" * (len(self.chunk_shape) - 1)

    def chunk(self, c: int) -> np.ndarray:
        import zstandard

        path = self.root / "c" / f"{c}{self.suffix}"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return np.full(self.chunk_shape, self.fill, dtype=self.dtype)
        size = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        data = np.frombuffer(zstandard.ZstdDecompressor().decompress(raw, max_output_size=size), dtype=self.dtype)
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
            arr = _Array(self.root / "arrays" / self.index.arrays[slot] / name)
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
        out = []
        for key, rec in zip(keys, recs):
            slot, start = int(rec["array"]), int(rec["row"])
            stop = start + int(rec["length"])
            parts = {name: self._rows(slot, name, start, stop) for name in self.parts}
            states = self.codec.decode(parts, self._params(slot))
            out.append(Entry(key, states, self._rows(slot, "tokens", start, stop), int(rec["boundary"])))
        return out

    def _params(self, slot: int) -> dict:
        params = self._codec_params.get(slot)
        if params is None:
            path = self.root / "arrays" / self.index.arrays[slot] / "codec.json"
            params = load_params(path.read_bytes() if path.exists() else None, self.codec,
                                 self.hidden_size, str(path))
            self._codec_params[slot] = params
        return params
