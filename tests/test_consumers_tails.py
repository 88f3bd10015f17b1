"""Tails (layers k..N-1) against the full transformers model, per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consumers import load_tail, tail_class
from tests.consumers_fixtures import FAMILIES, LAYER, entries, full_model, ids_of, zoo, consumer_corpus  # noqa: F401
from erstore.errors import IncompatibleStoreError


def padded(batch):
    n, d = max(len(e.states) for e in batch), batch[0].states.shape[1]
    h = torch.zeros(len(batch), n, d)
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for i, e in enumerate(batch):
        h[i, : len(e.states)] = torch.from_numpy(e.states.astype(np.float32))
        ids[i, : len(e.states)] = torch.from_numpy(e.token_ids.astype(np.int64))
        mask[i, : len(e.states)] = 1
    return h, ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_tail_matches_full_model_bit_exactly(zoo, family):
    store = zoo.store(family)
    tail = load_tail(store)
    full = full_model(zoo.model(family), family)
    with torch.no_grad():
        for e in entries(store):
            ids = ids_of(e)
            want = full(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            got = tail(torch.from_numpy(e.states)[None], torch.ones_like(ids))
            assert torch.equal(got, want), (family, (got - want).abs().max().item())
        # A padded batch: the full model's lower layers also ran padded, so rounding may differ.
        h, ids, mask = padded(entries(store))
        want = full(input_ids=ids, attention_mask=mask).last_hidden_state
        got = tail(h, mask)
        valid = mask.bool()
        assert (got[valid] - want[valid]).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_tail_keeps_only_upper_layers(zoo, family):
    store = zoo.store(family)
    tail = load_tail(store)
    names = list(tail.state_dict())
    assert not any(n.startswith(("embeddings.", "shared.")) or "word_embeddings" in n
                   or "embed_tokens" in n for n in names), names
    kept = {int(n.split(".")[2]) for n in names if n.split(".")[1] in ("layer", "block")}
    assert kept == set(range(LAYER, 4))
    info = tail.describe()
    assert 0 < info["parameters"] < info["full_parameters"] / 2
    full = full_model(zoo.model(family), family)
    # Parameter names are the transformers model's names.
    full_names = set(full.state_dict())
    shared = [n for n in names if not n.startswith("position_bias.")]
    assert set(shared) <= full_names


@pytest.mark.parametrize("layer", [0, 1])
def test_deberta_conv_tail_from_layers_0_and_1(zoo, layer):
    store = zoo.store("deberta-v2-conv", layer=layer)
    tail = load_tail(store)
    assert (tail.encoder.conv is not None) == (layer == 0)
    full = full_model(zoo.model("deberta-v2-conv"), "deberta-v2")
    with torch.no_grad():
        for e in entries(store)[:3]:
            ids = ids_of(e)
            want = full(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            assert torch.equal(tail(torch.from_numpy(e.states)[None]), want)


def test_t5_tail_at_last_layer_is_identity_and_layer0_computes_bias(zoo):
    full = full_model(zoo.model("t5"), "t5")
    for layer in (0, 4):
        store = zoo.store("t5", layer=layer)
        tail = load_tail(store)
        e = entries(store)[1]
        with torch.no_grad():
            want = full(input_ids=ids_of(e)).last_hidden_state
            assert torch.equal(tail(torch.from_numpy(e.states)[None]), want)


def test_t5_seq2seq_with_encoder_from_store(zoo):
    from transformers import T5ForConditionalGeneration

    from consumers.models.t5 import load_seq2seq

    store = zoo.store("t5")
    reduced = load_seq2seq(store)
    assert not list(reduced.model.encoder.parameters())
    full = T5ForConditionalGeneration.from_pretrained(zoo.model("t5"), attn_implementation="eager").eval()
    e = entries(store)[0]
    ids = ids_of(e)
    dec = torch.tensor([[0, 5, 9, 11]])
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
        got = reduced(torch.from_numpy(e.states)[None], torch.ones_like(ids), decoder_input_ids=dec).logits
        assert torch.equal(got, want)
        gen = reduced.generate(torch.from_numpy(e.states)[None], torch.ones_like(ids), max_new_tokens=3,
                               do_sample=False)
        assert torch.equal(gen, full.generate(input_ids=ids, max_new_tokens=3, do_sample=False))


def test_refuses_a_model_with_other_weights(zoo, tmp_path):
    from tests.conftest import save_tiny_model

    store = zoo.store("bert")
    other = save_tiny_model(tmp_path / "other", "bert", seed=1)
    with pytest.raises(IncompatibleStoreError) as info:
        load_tail(store, model=str(other))
    message = str(info.value)
    assert store.recipe.model_fingerprint in message and "model_fingerprint" in message
    assert str(other) in message


def test_refuses_a_family_without_tail_and_says_how_to_add_one():
    with pytest.raises(IncompatibleStoreError, match="mamba") as info:
        tail_class("mamba")
    assert "register_family" in str(info.value) and "erstore.families" in str(info.value)


@pytest.mark.parametrize("dtype,bound", [("float16", 5e-3), ("bfloat16", 5e-2)])
def test_half_precision_store_error_is_bounded(zoo, dtype, bound):
    store = zoo.store("bert", dtype=dtype)
    tail = load_tail(store)
    full = full_model(zoo.model("bert"), "bert")
    worst = 0.0
    with torch.no_grad():
        for e in entries(store):
            ids = ids_of(e)
            want = full(input_ids=ids).last_hidden_state
            got = tail(torch.from_numpy(e.states.astype(np.float32))[None])
            worst = max(worst, (got - want).abs().max().item())
    assert 0 < worst < bound
