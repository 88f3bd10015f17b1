"""How hidden states are laid out in TensorStore: dtype, chunking, compression, quantization.

A codec turns float activations [n, d] into one or more row-aligned arrays and back. It is part
of a store's recipe, so one store never mixes codecs. Codecs are frozen dataclasses with
`to_dict` / `from_dict` for the JSON metadata; `parse_codec("int4:group=64")` reads the CLI form.

- `lossless`: float32 / float16 / bfloat16 + zstd; with `shuffle=True` the bytes of each value
  are split into planes (zarr3 `transpose` codec) before zstd, which compresses ~10-15% better.
  Reads return exactly the stored dtype.
- `int8`: symmetric 8-bit codes; per-token scales, per-channel scales, or both (channels are first
  divided by a per-build channel scale, then each token gets its own absmax scale).
- `int4`: 16 symmetric levels (+-0.5 .. +-7.5 steps, no zero level: all 16 codes carry
  information) in groups of `group` channels with one float16 scale per group, after the same
  per-channel normalisation and a Hadamard rotation of each group; two codes per byte.
- `entropy`: uniform quantization with a per-token step (a fraction of the token's RMS), int8
  codes that zstd entropy-codes to ~4.3 bits per value at step 0.2; about 3x less squared error
  than `int4` for the same bytes on MiniLM states (benchmarks/bench_codecs.py). With `pca=1` the
  codes are coordinates on per-build principal axes (transform coding): less error per byte.

Lossy codecs fit per-build parameters (channel scales, principal axes) on the first flushed
rows; they are saved next to the build's arrays. Each documents a per-element error bound
(`error_bound`), checked by property tests. Decoding here is numpy; `erstore.torchcodecs`
mirrors it in torch for loaders that decode on the GPU.

Chunks hold a power-of-two number of token rows, about 768 KiB of codes each: big enough that
zstd and per-call overhead amortise, small enough that a random sequence read touches one or two
chunks (see shared FACTS: 1024-row chunks read in ~1 ms, 16k-row chunks in ~13 ms).
"""

from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from erstore.errors import CorruptStoreError, IncompatibleStoreError, InvalidInputError

DTYPES = ("float32", "float16", "bfloat16")
TARGET_CHUNK_BYTES = 768 * 1024
# Arrays are created with a fixed huge row count, so appends never rewrite array metadata.
MAX_ROWS = 2**40
# `entropy:pca=1` stores its rotation as int16 multiples of 1/ROTATION_ONE (entries are in [-1, 1]).
ROTATION_ONE = 2**14


def storage_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # ships with tensorstore

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _rows_per_chunk(row_bytes: float) -> int:
    return int(min(16384, max(64, 2 ** round(math.log2(TARGET_CHUNK_BYTES / row_bytes)))))


def _array(shape_tail: list[int], chunk_rows: int, dtype: str, level: int,
           transpose: list[int] | None = None) -> dict[str, Any]:
    codecs: list[dict[str, Any]] = []
    if transpose:
        codecs.append({"name": "transpose", "configuration": {"order": transpose}})
    # zstd's content checksum (xxh64 of the decoded chunk, checked by libzstd on every decode):
    # without it zstd often stores near-random fp16 bytes raw, so a flipped byte would decode to
    # silently different numbers. Measured (benchmarks/README.md, bench_verify): ~free, where the
    # zarr3 `crc32c` codec cost ~10% of TensorStore's read CPU.
    codecs += [{"name": "bytes", "configuration": {"endian": "little"}},
               {"name": "zstd", "configuration": {"level": level, "checksum": True}}]
    return {
        "shape": [MAX_ROWS, *shape_tail],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, *shape_tail]}},
        "data_type": dtype,
        "fill_value": 0,
        "codecs": codecs,
    }


def _scale_up_fp16(scale: np.ndarray) -> np.ndarray:
    """Round scales to float16 upwards, so codes never exceed their range after rounding."""
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float32) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


@dataclass(frozen=True)
class LosslessCodec:
    """Store activations as `dtype` with zstd (optionally byte-shuffled); reads are exact."""

    dtype: str = "float16"
    shuffle: bool = False
    zstd_level: int = 1
    name: ClassVar[str] = "lossless"
    lossless: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"unsupported dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")

    @property
    def itemsize(self) -> int:
        return storage_dtype(self.dtype).itemsize

    def rows_per_chunk(self, hidden_size: int) -> int:
        return _rows_per_chunk(hidden_size * self.itemsize)

    def arrays(self, hidden_size: int) -> dict[str, dict[str, Any]]:
        rows = self.rows_per_chunk(hidden_size)
        if self.shuffle:  # uint8 [rows, d, bytes], stored as byte planes [bytes, rows, d]
            return {"states": _array([hidden_size, self.itemsize], rows, "uint8", self.zstd_level, [2, 0, 1])}
        return {"states": _array([hidden_size], rows, self.dtype, self.zstd_level)}

    def fit(self, sample: np.ndarray) -> dict[str, Any]:
        return {}

    def encode(self, states: np.ndarray, params: dict[str, Any]) -> dict[str, np.ndarray]:
        values = np.ascontiguousarray(np.asarray(states).astype(storage_dtype(self.dtype), copy=False))
        if self.shuffle:
            return {"states": values.view(np.uint8).reshape(*values.shape, self.itemsize)}
        return {"states": values}

    def decode(self, parts: dict[str, np.ndarray], params: dict[str, Any]) -> np.ndarray:
        states = parts["states"]
        if self.shuffle:
            return np.ascontiguousarray(states).view(storage_dtype(self.dtype)).reshape(states.shape[:2])
        return states

    def error_bound(self, states: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """Exact in the stored dtype: zero after casting to it."""
        cast = np.asarray(states).astype(storage_dtype(self.dtype)).astype(np.float32)
        return np.abs(cast - states)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def _channel_scale(sample: np.ndarray) -> list[float]:
    """Per-channel absmax of the fit sample (floored so that silent channels stay finite)."""
    absmax = np.abs(sample.astype(np.float32)).max(axis=0) if len(sample) else np.ones(sample.shape[1])
    floor = max(float(absmax.max()) * 1e-3, 1e-12)
    return np.maximum(absmax, floor).astype(np.float32).tolist()


@dataclass(frozen=True)
class Int8Codec:
    """Symmetric int8 codes with per-token, per-channel, or per-channel-then-per-token scales."""

    scales: str = "both"
    zstd_level: int = 1
    name: ClassVar[str] = "int8"
    lossless: ClassVar[bool] = False
    dtype: ClassVar[str] = "int8"
    itemsize: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.scales not in ("token", "channel", "both"):
            raise InvalidInputError(f"int8 scales must be token, channel or both, got {self.scales!r}")

    def rows_per_chunk(self, hidden_size: int) -> int:
        return _rows_per_chunk(hidden_size)

    def arrays(self, hidden_size: int) -> dict[str, dict[str, Any]]:
        rows = self.rows_per_chunk(hidden_size)
        out = {"states": _array([hidden_size], rows, "int8", self.zstd_level)}
        if self.scales != "channel":
            out["scales"] = _array([1], rows, "float16", self.zstd_level)
        return out

    def fit(self, sample: np.ndarray) -> dict[str, Any]:
        return {} if self.scales == "token" else {"channel_scale": _channel_scale(sample)}

    def _normalise(self, states: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        x = np.asarray(states, dtype=np.float32)
        return x / np.asarray(params["channel_scale"], np.float32) if "channel_scale" in params else x

    def _token_scale(self, x: np.ndarray) -> np.ndarray:
        return _scale_up_fp16(np.abs(x).max(axis=1, keepdims=True) / 127)

    def encode(self, states: np.ndarray, params: dict[str, Any]) -> dict[str, np.ndarray]:
        x = self._normalise(states, params)
        if self.scales == "channel":  # values beyond the fitted range are clipped
            return {"states": np.clip(np.rint(x * 127), -127, 127).astype(np.int8)}
        scale = self._token_scale(x)
        safe = np.where(scale > 0, scale, 1).astype(np.float32)
        return {"states": np.clip(np.rint(x / safe), -127, 127).astype(np.int8), "scales": scale}

    def decode(self, parts: dict[str, np.ndarray], params: dict[str, Any]) -> np.ndarray:
        x = parts["states"].astype(np.float32)
        if self.scales == "channel":
            return x * (np.asarray(params["channel_scale"], np.float32) / 127)
        x *= parts["scales"].astype(np.float32)
        if "channel_scale" in params:
            x *= np.asarray(params["channel_scale"], np.float32)
        return x

    def error_bound(self, states: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """Half a quantization step per element (plus float32 rounding); clipped values excepted."""
        x = self._normalise(states, params)
        c = np.asarray(params.get("channel_scale", 1.0), np.float32)
        step = np.full_like(x, 1 / 127) if self.scales == "channel" else self._token_scale(x).astype(np.float32)
        return (0.5 * step + 1e-6 * np.abs(x)) * c * np.ones_like(x)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def _hadamard(n: int) -> np.ndarray:
    """Orthonormal Sylvester-Hadamard matrix of size n (a power of two); symmetric, H @ H = I."""
    h = np.ones((1, 1), dtype=np.float32)
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(np.float32(n))


@dataclass(frozen=True)
class Int4Codec:
    """Symmetric 4-bit codes in channel groups, one float16 scale per group, after channel scaling.

    With `rotate` (default) each group is multiplied by an orthonormal Hadamard matrix before
    quantizing: that spreads a group's outliers over all its values, so the group's absmax (and the
    quantization step) shrinks towards its RMS. Decoding rotates back (the matrix is its own inverse).
    """

    group: int = 64
    rotate: bool = True
    zstd_level: int = 1
    name: ClassVar[str] = "int4"
    lossless: ClassVar[bool] = False
    dtype: ClassVar[str] = "int4"
    itemsize: ClassVar[float] = 0.5

    def __post_init__(self) -> None:
        if self.group < 2 or self.group % 2:
            raise InvalidInputError(f"int4 group must be an even number >= 2, got {self.group}")
        if self.rotate and self.group & (self.group - 1):
            raise InvalidInputError(f"int4 with rotate needs a power-of-two group, got {self.group}")

    def _groups(self, hidden_size: int) -> int:
        if hidden_size % self.group:
            raise InvalidInputError(
                f"int4 group {self.group} does not divide hidden size {hidden_size}; pick a divisor "
                f"(e.g. --codec int4:group={math.gcd(hidden_size, 64)})"
            )
        return hidden_size // self.group

    def rows_per_chunk(self, hidden_size: int) -> int:
        return _rows_per_chunk(hidden_size / 2)

    def arrays(self, hidden_size: int) -> dict[str, dict[str, Any]]:
        rows, groups = self.rows_per_chunk(hidden_size), self._groups(hidden_size)
        return {"states": _array([hidden_size // 2], rows, "uint8", self.zstd_level),
                "scales": _array([groups], rows, "float16", self.zstd_level)}

    def fit(self, sample: np.ndarray) -> dict[str, Any]:
        return {"channel_scale": _channel_scale(sample)}

    def _grouped(self, states: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        x = np.asarray(states, dtype=np.float32) / np.asarray(params["channel_scale"], np.float32)
        g = x.reshape(len(x), self._groups(x.shape[1]), self.group)
        return g @ _hadamard(self.group) if self.rotate else g

    def _scale(self, g: np.ndarray) -> np.ndarray:
        return _scale_up_fp16(np.abs(g).max(axis=2) / 7.5)

    def encode(self, states: np.ndarray, params: dict[str, Any]) -> dict[str, np.ndarray]:
        g = self._grouped(states, params)
        scale = self._scale(g)
        safe = np.where(scale > 0, scale, 1).astype(np.float32)[..., None]
        codes = np.clip(np.rint(g / safe + 7.5), 0, 15).astype(np.uint8).reshape(len(g), -1)
        return {"states": codes[:, 0::2] | (codes[:, 1::2] << 4), "scales": scale}

    def decode(self, parts: dict[str, np.ndarray], params: dict[str, Any]) -> np.ndarray:
        packed, scale = parts["states"], parts["scales"].astype(np.float32)
        codes = np.empty((len(packed), packed.shape[1] * 2), dtype=np.uint8)
        codes[:, 0::2] = packed & 0x0F
        codes[:, 1::2] = packed >> 4
        x = (codes.astype(np.float32) - 7.5).reshape(len(packed), scale.shape[1], self.group)
        x *= scale[..., None]
        if self.rotate:
            x = x @ _hadamard(self.group)
        return x.reshape(len(packed), -1) * np.asarray(params["channel_scale"], np.float32)

    def error_bound(self, states: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """Half a quantization step of the element's group, in original units; with `rotate`,
        sqrt(group) times that (the rotation can gather a group's errors into one value)."""
        g = self._grouped(states, params)
        half = 0.5 * self._scale(g).astype(np.float32)[..., None] * (np.sqrt(self.group) if self.rotate else 1)
        slack = 1e-5 * np.abs(g).max(axis=2, keepdims=True) * np.sqrt(self.group)
        bound = np.broadcast_to(half + slack, g.shape).reshape(len(g), -1)
        return bound * np.asarray(params["channel_scale"], np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class EntropyCodec:
    """Uniform quantization with a per-token step, entropy-coded by zstd.

    Each token's step is `step` times its RMS (coarser only if a value would pass 127 steps); codes
    are int8 and zstd's Huffman stage packs them close to their entropy. For the same bytes this
    beats fixed-width 4-bit codes: a uniform quantizer followed by entropy coding is within 0.25
    bit of the rate-distortion bound, and rare large values cost a few bits instead of stretching
    every value's step. Error: at most half a step per element.

    With `pca`, each build fits a mean and an orthonormal rotation onto the principal axes of its
    first rows (transform coding, as in JPEG's DCT). Hidden states are strongly correlated
    across channels, so in that basis most coordinates are small: the same step costs ~0.3 bit
    less per value and, because the rotation preserves distances, gives the same squared error.
    Codes are stored component-major within a chunk (coordinates of similar spread together),
    which zstd codes another ~0.2 bit tighter. Decoding adds one d x d matrix product per token,
    done exactly (integer codes times an integer rotation, see `decode`), so it is deterministic.
    """

    step: float = 0.2
    pca: bool = False
    zstd_level: int = 1
    name: ClassVar[str] = "entropy"
    lossless: ClassVar[bool] = False
    dtype: ClassVar[str] = "int8"
    itemsize: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not isinstance(self.step, (int, float)) or not 0 < self.step <= 4:
            raise InvalidInputError(f"entropy step must be in (0, 4] (a fraction of token RMS), got {self.step}")

    def rows_per_chunk(self, hidden_size: int) -> int:
        return _rows_per_chunk(hidden_size)

    def arrays(self, hidden_size: int) -> dict[str, dict[str, Any]]:
        rows = self.rows_per_chunk(hidden_size)
        return {"states": _array([hidden_size], rows, "int8", self.zstd_level, [1, 0] if self.pca else None),
                "scales": _array([1], rows, "float16", self.zstd_level)}

    def fit(self, sample: np.ndarray) -> dict[str, Any]:
        if not self.pca:
            return {}
        x = np.asarray(sample, dtype=np.float64)
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        centered = x - mean
        _, vectors = np.linalg.eigh(centered.T @ centered)  # orthonormal even for few rows
        axes = vectors[:, ::-1]  # largest spread first
        rotation = np.rint(axes * ROTATION_ONE).astype(np.int16)
        return {"mean": mean.astype(np.float32).tolist(),
                "rotation": base64.b64encode(np.ascontiguousarray(rotation).tobytes()).decode("ascii")}

    def basis(self, params: dict[str, Any], d: int) -> tuple[np.ndarray, np.ndarray]:
        """The build's mean [d] (float32) and rotation [d, d] as integers (units of 1/ROTATION_ONE)."""
        return np.asarray(params["mean"], np.float32), _rotation(params["rotation"], d)

    def _coded(self, x: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """What is quantized: the states, or their coordinates on the build's principal axes."""
        if not self.pca:
            return x
        mean, rotation = self.basis(params, x.shape[1])
        return ((x - mean).astype(np.float64) @ (rotation / ROTATION_ONE)).astype(np.float32)

    def _step(self, x: np.ndarray, coded: np.ndarray) -> np.ndarray:
        rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=1, keepdims=True)).astype(np.float32)
        return _scale_up_fp16(np.maximum(rms * np.float32(self.step), np.abs(coded).max(axis=1, keepdims=True) / 127))

    def encode(self, states: np.ndarray, params: dict[str, Any]) -> dict[str, np.ndarray]:
        x = np.asarray(states, dtype=np.float32)
        coded = self._coded(x, params)
        step = self._step(x, coded)
        safe = np.where(step > 0, step, 1).astype(np.float32)
        return {"states": np.clip(np.rint(coded / safe), -127, 127).astype(np.int8), "scales": step}

    def decode(self, parts: dict[str, np.ndarray], params: dict[str, Any]) -> np.ndarray:
        if not self.pca:
            return parts["states"].astype(np.float32) * parts["scales"].astype(np.float32)
        # Integer codes times integer rotation, summed in float64: every partial sum is an integer
        # below 2**53, so the result is exact whatever order BLAS adds in. A sequence therefore
        # decodes to the same bits whichever other rows share its read (and in torch, on a GPU).
        mean, rotation = self.basis(params, parts["states"].shape[1])
        exact = parts["states"].astype(np.float64) @ rotation.T.astype(np.float64)
        return (exact * (parts["scales"].astype(np.float64) / ROTATION_ONE)).astype(np.float32) + mean

    def error_bound(self, states: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """Half a step per coded value; with `pca`, element i of a token can gather the errors of
        every coordinate (half a step times the L1 norm of row i of the rotation), plus what the
        integer rotation's small departure from orthonormality moves."""
        x = np.asarray(states, dtype=np.float32)
        coded = self._coded(x, params)
        half = 0.5 * self._step(x, coded).astype(np.float32)
        if not self.pca:
            return np.broadcast_to(half, x.shape) + 1e-6 * np.abs(x)
        mean, rotation = self.basis(params, x.shape[1])
        q = rotation.astype(np.float64) / ROTATION_ONE
        gather = np.abs(q).sum(axis=1)[None, :]
        drift = np.abs(x - mean).astype(np.float64) @ np.abs(q @ q.T - np.eye(len(q)))
        return (half * gather + drift + 1e-5 * (np.abs(x) + np.abs(coded).max(axis=1, keepdims=True) * gather)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, **asdict(self)}
        if not self.pca:  # recipes of stores built before the option existed stay equal
            del out["pca"]
        return out


@functools.lru_cache(maxsize=16)
def _rotation(encoded: str, d: int) -> np.ndarray:
    """An `entropy:pca=1` build's int16 rotation, decoded once per build rather than per read
    (base64 of d x d values: ~0.4 MB at d = 384). Read-only, so sharing it is safe."""
    return np.frombuffer(base64.b64decode(encoded), dtype=np.int16).reshape(d, d)


Codec = LosslessCodec | Int8Codec | Int4Codec | EntropyCodec
_CODECS: dict[str, type] = {"lossless": LosslessCodec, "int8": Int8Codec, "int4": Int4Codec,
                            "entropy": EntropyCodec}


def load_params(raw: bytes | None, codec: Codec, hidden_size: int, where: str) -> dict[str, Any]:
    """A build's codec parameters from the bytes of its codec.json (`where`; None: no file).

    Raises CorruptStoreError naming the file if it is not JSON or does not fit `codec`.
    """
    try:
        params = json.loads(raw) if raw else {}
    except ValueError as e:
        problem: str | None = f"is not JSON ({e})"
    else:
        problem = params_problem(codec, params, hidden_size)
    if problem:
        raise CorruptStoreError(f"{where} {problem}: the build's codec parameters are damaged; restore "
                                "the file from a copy of the store, or rebuild (`erstore verify` lists "
                                "what else is damaged)")
    return params


def params_problem(codec: Codec, params: Any, hidden_size: int) -> str | None:
    """What is wrong with a build's codec parameters (its codec.json) for `codec`, or None."""
    if not isinstance(params, dict):
        return "is not a JSON object"
    needed = set()
    if isinstance(codec, Int4Codec) or (isinstance(codec, Int8Codec) and codec.scales == "channel"):
        needed.add("channel_scale")
    if isinstance(codec, EntropyCodec) and codec.pca:
        needed |= {"mean", "rotation"}
    if missing := sorted(needed - params.keys()):
        return f"lacks {', '.join(missing)}"
    for name in ("channel_scale", "mean"):
        if name not in params:
            continue
        try:
            values = np.asarray(params[name], dtype=np.float64)
        except (TypeError, ValueError):
            return f"has a non-numeric {name}"
        positive = name == "channel_scale"
        if values.shape != (hidden_size,) or not np.isfinite(values).all() or (positive and (values <= 0).any()):
            return f"has a {name} that is not {hidden_size} finite{' positive' if positive else ''} numbers"
    if "rotation" in params:
        try:
            size = len(base64.b64decode(params["rotation"], validate=True))
        except (TypeError, ValueError):  # binascii.Error is a ValueError
            return "has a rotation that is not base64 text"
        if size != hidden_size * hidden_size * 2:
            return f"has a rotation of {size} bytes, not {hidden_size} x {hidden_size} int16 values"
    return None


def codec_from_dict(data: dict[str, Any]) -> Codec:
    cls = _CODECS.get(data.get("name", ""))
    if cls is None:
        raise IncompatibleStoreError(f"unknown codec {data.get('name')!r}; upgrade erstore to read this store")
    return cls(**{k: v for k, v in data.items() if k != "name"})


def parse_codec(text: str, *, dtype: str = "float16") -> Codec:
    """Read the CLI form: ``lossless``, ``shuffle``, ``int8[:scales=token|channel|both]``,
    ``int4[:group=64]``, ``entropy[:step=0.2][,pca=1]`` (lossless forms use `dtype` unless they name
    one, as in ``shuffle:dtype=bfloat16``)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidInputError(f"codec option {item!r} should look like name=value")
        key = key.strip().replace("-", "_")
        options[key] = _flag(value) if key in ("shuffle", "rotate", "pca") else _number(value.strip())
    try:
        if name == "lossless":
            return LosslessCodec(**{"dtype": dtype, **options})
        if name == "shuffle":
            return LosslessCodec(**{"dtype": dtype, "shuffle": True, **options})
        if name in ("int8", "int4", "entropy"):
            return _CODECS[name](**options)
    except TypeError as e:
        raise InvalidInputError(f"bad options for codec {name!r}: {e}") from e
    raise InvalidInputError(
        f"unknown codec {text!r}: choose lossless, shuffle, int8[:scales=token|channel|both], "
        "int4[:group=N] or entropy[:step=0.2][,pca=1]"
    )


def _flag(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError(f"expected true or false, got {text!r}")


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
