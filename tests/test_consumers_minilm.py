"""The reduced model on the packaged all-MiniLM-L6-v2 (real weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erstore
from consumers import ReducedModel, load_tail
from tests.conftest import SENTENCES, write_jsonl


@pytest.mark.minilm
def test_minilm_tail_is_exact_and_small(tmp_path):
    from transformers import AutoModel

    from erstore.tokenize import resolve_model

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES)])
    for dtype in ("float32", "float16"):
        erstore.build(layers=(3,), corpus=str(corpus), store=str(tmp_path / dtype), dtype=dtype,
                      progress=False, max_length=64, batch_size=1)
    full = AutoModel.from_pretrained(resolve_model("all-MiniLM-L6-v2")).eval()
    worst = {}
    for dtype in ("float32", "float16"):
        store = erstore.open(str(tmp_path / dtype))
        tail = load_tail(store)
        info = tail.describe()
        assert info["layers"] == "3..5" and info["parameters"] < 0.25 * info["full_parameters"]
        worst[dtype] = 0.0
        with torch.no_grad():
            for e in store.read([store.key_for(s) for s in SENTENCES]):
                ids = torch.from_numpy(e.token_ids.astype(np.int64))[None]
                want = full(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
                got = tail(torch.from_numpy(e.states.astype(np.float32))[None])
                if dtype == "float32":
                    assert torch.equal(got, want)
                worst[dtype] = max(worst[dtype], (got - want).abs().max().item())
    assert 0 < worst["float16"] < 1e-2
    reduced = ReducedModel.for_store(erstore.open(str(tmp_path / "float32")), task="sequence", num_labels=2)
    out = reduced.predict(["Not in the store at all."], store=erstore.open(str(tmp_path / "float32")))
    assert out[0].shape == (2,)
