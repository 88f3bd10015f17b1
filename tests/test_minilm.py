"""The packaged all-MiniLM-L6-v2 with real weights: stored states are transformers' hidden_states[k]."""

from __future__ import annotations

import pytest
import torch
import transformers

import erstore
from erstore.builder import BuildConfig, build
from erstore.corpus import default_corpus
from erstore.tokenize import resolve_model

pytestmark = pytest.mark.minilm


def test_default_corpus_is_deterministic_real_prose():
    docs = default_corpus(300)
    assert len(docs) == 300 and docs == default_corpus(300)
    assert len({d.text for d in docs}) == 300
    assert all(d.text[0].isupper() and len(d.text) >= 80 and len(d.text.split()) >= 8 for d in docs)


def test_float32_store_equals_hidden_states_bit_exact(tmp_path):
    [result] = build(BuildConfig(limit=120, store=str(tmp_path / "s"), dtype="float32", progress=False))
    assert result.layer == 3  # default: the middle of MiniLM's 6 layers
    path = resolve_model("all-MiniLM-L6-v2")
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with erstore.open(tmp_path / "s") as store:
        assert store.recipe.hidden_size == 384 and store.recipe.num_layers == 6
        assert len(store) == 120
        docs = default_corpus(120)
        for doc in docs[::6]:  # each sequence run alone, as a user would check it
            ids = tok(doc.text, truncation=True, max_length=512)["input_ids"]
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[3][0]
            states, stored_ids = store.get(store.key_for(doc.text), with_token_ids=True)
            assert stored_ids.tolist() == ids
            assert states.tobytes() == ref.numpy().tobytes()
