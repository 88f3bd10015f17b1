"""Decoding with torch (what a GPU loader does) gives what numpy decoding gives, codec by codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erstore
from erstore import torchcodecs
from erstore.codecs import EntropyCodec, Int4Codec, Int8Codec, LosslessCodec
from erstore.keys import key_for_ids
from erstore.writer import StoreWriter
from tests.test_codecs import CODECS, activations, recipe


def exact(codec) -> bool:
    """Everything but int4's Hadamard rotation (a BLAS matrix product) decodes to the same bits."""
    return not (isinstance(codec, Int4Codec) and codec.rotate)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: str(c.to_dict()))
def test_torch_decode_equals_numpy_decode(codec):
    x = activations(np.random.default_rng(5), 40, 64)
    params = codec.fit(x)
    parts = codec.encode(x, params)
    want = np.asarray(codec.decode(parts, params), dtype=np.float32)
    got = torchcodecs.decode(codec, {n: torchcodecs.as_tensor(p) for n, p in parts.items()}, params)
    assert got.dtype == torch.float32 and got.shape == want.shape
    if exact(codec):
        np.testing.assert_array_equal(got.numpy(), want)
    else:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("codec", [Int8Codec("both"), Int4Codec(16), Int4Codec(16, rotate=False),
                                   EntropyCodec(0.2, pca=True),
                                   LosslessCodec("bfloat16", shuffle=True)], ids=lambda c: str(c.to_dict()))
def test_loader_decoding_on_device_matches_host_decoding(tmp_path, codec, device):
    # Two builds, so batches mix rows of two sets of codec parameters (channel scales differ).
    rng = np.random.default_rng(6)
    path = tmp_path / "store"
    for build in range(2):
        with StoreWriter(path, recipe(codec, 32), flush_bytes=1) as w:
            for _ in range(15):
                ids = rng.integers(0, 30000, size=int(rng.integers(1, 20)))
                w.append(key_for_ids(ids.tolist()), activations(rng, len(ids), 32) * (1 + 9 * build), ids)
            w.commit()
    store = erstore.open(path)
    assert store._array(0).params != store._array(1).params or codec.lossless
    labels = {k: i for i, k in enumerate(store)}
    # Small shuffle windows: several read groups, each decoded batch by batch.
    options = dict(labels=labels, batch_size=4, shuffle=True, seed=2, block_rows=16, buffer_blocks=2)
    host = store.loader(**options)
    decoded = list(store.loader(**options, device=device, decode_on_device=True))
    assert all(b["hidden_states"].device.type == device for b in decoded)
    pairs = [(a, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()})
             for a, b in zip(host, decoded)]
    assert len(pairs) == len(host) and {len(b["keys"]) for b, _ in pairs} == {4, 2}
    for a, b in pairs:
        assert a.keys() == b.keys() and a["keys"] == b["keys"]
        for i, key in enumerate(a["keys"]):  # host batches hold what store.get decodes
            want = torch.from_numpy(np.asarray(store.get(key), np.float32))
            got = a["hidden_states"][i, : len(want)]
            assert torch.equal(got, want) if exact(codec) else torch.allclose(got, want, rtol=1e-5, atol=1e-4)
        for name in ("attention_mask", "input_ids", "labels", "boundaries"):
            assert torch.equal(a[name], b[name]), name
        if exact(codec):
            assert torch.equal(a["hidden_states"], b["hidden_states"])
        else:
            torch.testing.assert_close(b["hidden_states"], a["hidden_states"], rtol=1e-5, atol=1e-4)
        assert not b["hidden_states"][b["attention_mask"] == 0].any()
