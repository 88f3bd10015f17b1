"""Decoding stored codes with torch, on whatever device the codes are on (a GPU when present).

`erstore.codecs` decodes with numpy on the reader's CPU thread. A loader feeding a GPU can
instead copy the stored codes to the device (int8 / 4-bit codes are 4-8x smaller than the float32
states they decode to, so the host-to-device copy shrinks by as much) and decode them there with
the same arithmetic, in the same order of float32 operations: on the CPU every codec decodes to
exactly the numpy result (tested), except that `int4`'s Hadamard rotation is a matrix product
whose summation order is the BLAS library's (float32 rounding, ~1e-7 relative).
(`entropy:pca=1`'s rotation is exact integer arithmetic in float64, hence equal everywhere.)

Only `erstore.torchdata` (assemble.py) imports this module. Not here: encoding (builds encode with numpy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from erstore.codecs import (ROTATION_ONE, Codec, EntropyCodec, Int4Codec, Int8Codec, LosslessCodec, _hadamard,
                            _rotation)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing a numeric numpy array's memory where possible (read-only arrays are
    copied; ml_dtypes' bfloat16 goes through its 16-bit pattern)."""
    a = np.ascontiguousarray(array)
    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits as torch.bfloat16
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _param(params: Mapping[str, Any], name: str, device: torch.device) -> torch.Tensor:
    """A build's float32 parameter vector on `device`, copied there once per build and device: a
    copy per batch from pageable memory would make the loader's stream wait for it each time."""
    return _param_on(np.asarray(params[name], np.float32).tobytes(), device)


@functools.lru_cache(maxsize=64)
def _param_on(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.float32).to(device)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _lossless(codec: LosslessCodec, parts: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
    states = parts["states"]
    if codec.shuffle:  # uint8 [n, d, bytes]: the bytes of each value, reassembled
        states = states.contiguous().view(_TORCH_DTYPES[codec.dtype]).squeeze(2)
    return states.to(torch.float32)


def _int8(codec: Int8Codec, parts: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
    x = parts["states"].to(torch.float32)
    device = x.device
    if codec.scales == "channel":
        return x * (_param(params, "channel_scale", device) / 127)
    x *= parts["scales"].to(torch.float32)
    if "channel_scale" in params:
        x *= _param(params, "channel_scale", device)
    return x


def _int4(codec: Int4Codec, parts: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
    packed, scale = parts["states"], parts["scales"].to(torch.float32)
    n = len(packed)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(n, -1)
    x = (codes.to(torch.float32) - 7.5).reshape(n, scale.shape[1], codec.group)
    x *= scale[..., None]
    if codec.rotate:
        x = x @ _hadamard_on(codec.group, x.device)
    return x.reshape(n, -1) * _param(params, "channel_scale", x.device)


def _entropy(codec: EntropyCodec, parts: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
    if not codec.pca:
        return parts["states"].to(torch.float32) * parts["scales"].to(torch.float32)
    codes, device = parts["states"], parts["states"].device
    exact = codes.to(torch.float64) @ _rotation_t(params["rotation"], codes.shape[1], device)
    scaled = exact * (parts["scales"].to(torch.float64) / ROTATION_ONE)
    return scaled.to(torch.float32) + _param(params, "mean", device)


@functools.lru_cache(maxsize=16)
def _hadamard_on(group: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_hadamard(group)).to(device)


@functools.lru_cache(maxsize=16)
def _rotation_t(encoded: str, d: int, device: torch.device) -> torch.Tensor:
    """A build's transposed rotation as float64 on `device`: converted and copied once per build,
    not once per batch (d x d x 8 bytes: 1.2 MB at d = 384)."""
    return torch.from_numpy(_rotation(encoded, d).T.astype(np.float64)).to(device)


_DECODERS: dict[type, Callable[..., torch.Tensor]] = {
    LosslessCodec: _lossless, Int8Codec: _int8, Int4Codec: _int4, EntropyCodec: _entropy,
}


def decode(codec: Codec, parts: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
    """Float32 states [n, d] from a build's stored parts (tensors on one device), on that device.

    Args:
        codec: the store's codec (`store.codec`).
        parts: the codec's row-aligned arrays as tensors (see `codec.arrays`), e.g. int8 codes
            and float16 scales.
        params: the build's codec parameters (`RawEntry.params`).
    """
    return _DECODERS[type(codec)](codec, parts, params)
