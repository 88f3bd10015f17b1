"""Save-and-recycle training, training on erstore.torchdata batches, predict on a quantized store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erstore
from consumers import ReducedModel, recipe_for, save_and_recycle, train
from consumers.recycle import SaveAndRecycle
from erstore.errors import InvalidInputError
from erstore.model import LayerExtractor
from tests.conftest import SENTENCES
from tests.consumers_fixtures import consumer_corpus, zoo  # noqa: F401

NEW = [
    "Save and recycle computes the lower layers only in the first epoch.",
    "Later epochs read the stored activations instead of recomputing them.",
    "A corpus that is not in the store yet gets written while training.",
    "The tokenizer decides which windows exist and what their keys are.",
    "Short text.",
    "Gradient steps in the upper layers do not change the lower layers.",
    "Save and recycle computes the lower layers only in the first epoch.",  # a duplicate window
]


def by_key(batch):
    return {k: batch["hidden_states"][i, : int(batch["attention_mask"][i].sum())].clone()
            for i, k in enumerate(batch["keys"])}


def test_save_and_recycle_stores_epoch_one_and_reads_it_back(zoo, tmp_path):
    source = zoo.store("bert")
    model = ReducedModel.for_store(source, task="sequence", num_labels=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = tmp_path / "sr"
    seen: dict[int, dict[str, torch.Tensor]] = {0: {}, 1: {}, 2: {}}
    keys = {source.key_for(t) for t in NEW}

    def on_batch(epoch, batch):
        seen[epoch].update(by_key(batch))
        if epoch == 1:  # epoch 1 committed: the store holds the whole corpus
            stored = erstore.open(str(target))
            assert stored.version == 1 and set(stored) == keys

    report = save_and_recycle(model, str(target), NEW, [i % 2 for i in range(len(NEW))], epochs=3,
                              batch_size=3, lr=1e-2, on_batch=on_batch)
    assert report.version == 1 and [e["computed"] for e in report.epochs] == [len(NEW), 0, 0]
    assert [e["read"] for e in report.epochs] == [0, len(NEW), len(NEW)]
    assert len(report.losses) == 3 * 3 and all(np.isfinite(report.losses))
    store = erstore.open(str(target))
    assert len(store) == len(keys) and [v.version for v in store.versions()] == [1]
    assert set(seen[0]) == set(seen[1]) == set(seen[2]) == keys
    extractor = LayerExtractor(source.recipe.model_name)
    for entry in store.read(sorted(keys)):
        computed = seen[0][entry.key]
        np.testing.assert_array_equal(entry.states, computed.numpy())  # fp32 store: what was computed
        torch.testing.assert_close(seen[1][entry.key], computed, rtol=0, atol=0)
        torch.testing.assert_close(seen[2][entry.key], computed, rtol=0, atol=0)
        ids = torch.from_numpy(entry.token_ids.astype(np.int64))[None]
        alone = extractor(ids, torch.ones_like(ids), torch.zeros_like(ids), [2])[2][0]
        torch.testing.assert_close(computed, alone, rtol=0, atol=1e-5)  # padded batch: rounding only
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())

    again = SaveAndRecycle(model, store, batch_size=4).fit(NEW, [0] * len(NEW), epochs=1)
    assert again.version is None and again.epochs[0]["computed"] == 0
    assert again.epochs[0]["read"] == len(NEW)


def test_recipe_for_matches_a_build_and_fp16_epochs_agree(zoo, tmp_path):
    built = zoo.store("bert", dtype="float16")
    recipe = recipe_for(built.recipe.model_name, layer=2, dtype="float16", max_length=64)
    assert built.recipe.differences(recipe) == []
    model = ReducedModel.for_store(recipe, task="token", num_labels=3)
    windows = [built.tokenize(t)[0][0] for t in NEW]
    labels = [[-100] + [(tok + j) % 3 for j, tok in enumerate(ids[1:])] for ids in windows]  # [CLS] ignored
    seen: dict[int, dict[str, torch.Tensor]] = {0: {}, 1: {}}
    report = save_and_recycle(model, tmp_path / "fp16", NEW, labels, epochs=2, batch_size=4,
                              on_batch=lambda e, b: seen[e].update(by_key(b)))
    assert report.version == 1
    store = erstore.open(str(tmp_path / "fp16"))
    for entry in store.read(list(seen[0])):
        stored = torch.from_numpy(entry.states.astype(np.float32))
        assert torch.equal(seen[0][entry.key], stored) and torch.equal(seen[1][entry.key], stored)
    with pytest.raises(InvalidInputError, match="per-token labels"):
        save_and_recycle(model, tmp_path / "fp16", NEW[:1], [[0, 1]], epochs=1)
    with pytest.raises(InvalidInputError, match="different labels"):
        save_and_recycle(model, tmp_path / "fp16", [NEW[0], NEW[0]], [0, 1], epochs=1)


def test_train_takes_torchdata_loader_batches(zoo):
    store = zoo.store("bert")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    head = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    labels = {store.key_for(s): i % 2 for i, s in enumerate(SENTENCES)}
    with store.loader(labels=labels, batch_size=3, shuffle=True, seed=1) as batches:
        losses = train(model, batches, epochs=2, lr=1e-2)
        assert len(losses) == 2 * len(batches)
    assert all(np.isfinite(losses))
    assert any(not torch.equal(p.detach(), head[n]) for n, p in model.head.named_parameters())
    with pytest.raises(ValueError, match="keys and one label"):
        train(model, store, epochs=1)


def test_predict_miss_on_int8_store_uses_build_params(zoo, tmp_path):
    erstore.build(model=str(zoo.model("bert")), layers=(2,), corpus=str(zoo.corpus), store=str(tmp_path / "q"),
                  codec="int8", progress=False, max_length=64)
    store = erstore.open(str(tmp_path / "q"))
    params = store._array(0).params
    assert params.get("channel_scale")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    misses = model.predict(NEW[:3], store=store, write_back=True)  # fitted on 3 texts, not each alone
    grown = erstore.open(str(tmp_path / "q"))
    assert grown.version == 2 and all(grown._array(i).params == params for i in range(2))
    hits = model.predict(NEW[:3], store=grown)
    np.testing.assert_array_equal(np.stack(hits), np.stack(misses))
