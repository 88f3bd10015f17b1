"""Content keys: a deterministic 128-bit name for a tokenized sequence.

A key is the xxh3-128 digest (seed 0) of a little-endian byte string:

    uint32 number of segment boundaries, uint32 boundaries..., uint32 token ids...

so it depends only on the token ids and, for text pairs, on where the second segment starts.
It never involves Python's randomized `hash()`, so it is the same in every process, machine and
Python version; `tests/test_keys.py` pins golden values. Keys are handed to users as 32-char
lowercase hex strings and stored as two uint64 halves (`hi`, `lo`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

from erstore.errors import InvalidInputError

KEY_HEX_CHARS = 32


def key_for_ids(token_ids: Sequence[int] | np.ndarray, *, boundaries: Sequence[int] = ()) -> str:
    """Return the key of a token id sequence (and its segment boundaries for text pairs)."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise InvalidInputError(f"token ids must be one-dimensional, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise InvalidInputError("token ids must lie in [0, 2**32); got a value outside that range")
    header = np.asarray([len(boundaries), *boundaries], dtype="<u4")
    h = xxhash.xxh3_128()
    h.update(memoryview(header))
    h.update(memoryview(np.ascontiguousarray(ids, dtype="<u4")))
    return h.hexdigest()


def split_key(key: str) -> tuple[int, int]:
    """Return the (hi, lo) uint64 halves of a hex key, validating it."""
    if not isinstance(key, str) or len(key) != KEY_HEX_CHARS:
        raise InvalidInputError(
            f"a key is a {KEY_HEX_CHARS}-character hex string (from store.key_for...), got {key!r}"
        )
    try:
        return int(key[:16], 16), int(key[16:], 16)
    except ValueError as e:
        raise InvalidInputError(f"key {key!r} is not hexadecimal") from e


def join_key(hi: int, lo: int) -> str:
    """Inverse of `split_key`."""
    return f"{int(hi):016x}{int(lo):016x}"


def window_key(token_ids: Sequence[int] | np.ndarray, boundary: int = 0) -> str:
    """Key of one stored window; `boundary` is where a pair's second segment starts (0: none)."""
    return key_for_ids(token_ids, boundaries=(boundary,) if boundary else ())


_NO_BOUNDARY = np.zeros(1, dtype="<u4").tobytes()


def fast_window_key(ids: np.ndarray, boundary: int) -> str:
    """`window_key` for ids already as a little-endian uint32 array (the build's tokenizer
    output), without re-checking them: the same bytes are hashed (tests pin the equality), at a
    fraction of the per-call cost."""
    header = _NO_BOUNDARY if not boundary else np.array([1, boundary], dtype="<u4").tobytes()
    return xxhash.xxh3_128_hexdigest(header + ids.tobytes())
