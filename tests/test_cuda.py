"""The Loader's CUDA path: pinned staging buffers, side-stream copies, decoding on the GPU.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import erstore
from tests.test_torchdata import check_batch, prefetch_threads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_host(batch: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("decode_on_device, producer", [(True, "thread"), (False, "thread"), (None, "process")],
                         ids=["decode-on-gpu", "pinned-host-decode", "process-registered-slots"])
def test_cuda_batches_equal_host_batches(read_store, decode_on_device, producer):
    store = erstore.open(read_store)
    labels = {k: i for i, k in enumerate(store)}
    options = dict(labels=labels, batch_size=3, shuffle=True, seed=4, block_rows=16, buffer_blocks=2, prefetch=1)
    host = list(store.loader(**options))
    # All batches are kept while later ones are prepared: with prefetch=1 the pinned staging
    # buffers are reused many times, so a copy still in flight when its buffer was refilled
    # would show up as a wrong batch here.
    # (producer="process": one copy per run from a cudaHostRegister-ed shared slot, which goes
    # back to the child once that copy is done.)
    with store.loader(**options, device="cuda", decode_on_device=decode_on_device, producer=producer) as loader:
        gpu = list(loader)
    assert len(gpu) == len(host) > 3
    torch.cuda.synchronize()
    for a, b in zip(host, gpu):
        assert b["hidden_states"].device.type == "cuda" and b["attention_mask"].device.type == "cuda"
        assert "_event" not in b
        b = on_host(b)
        assert a.keys() == b.keys() and a["keys"] == b["keys"]
        for name in ("hidden_states", "attention_mask", "input_ids", "labels", "boundaries"):
            assert torch.equal(a[name], b[name]), name
        check_batch(store, b)


@pytest.mark.parametrize("producer", ["thread", "process"])
def test_cuda_batches_are_usable_on_the_consumers_stream(read_store, producer):
    # The loader copies on its own stream; the batch must be complete for work queued on the
    # consumer's current stream without any synchronize() by the consumer.
    store = erstore.open(read_store)
    expected = [float(b["hidden_states"].double().sum()) for b in store.loader(batch_size=4)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), store.loader(batch_size=4, device="cuda", producer=producer) as loader:
        sums = [b["hidden_states"].double().sum() for b in loader]
    stream.synchronize()
    np.testing.assert_allclose([float(s) for s in sums], expected, rtol=1e-12)


def test_cuda_loader_early_stop_leaves_no_thread(read_store):
    store = erstore.open(read_store)
    for pinned in (False, True):
        with store.loader(batch_size=2, prefetch=1, device="cuda", decode_on_device=not pinned) as loader:
            for _ in loader:
                break
        gc.collect()
        assert prefetch_threads() == []
