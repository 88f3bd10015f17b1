"""Adapters, LoRA, training loops, save/load and predict on new text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erstore
from consumers import ReducedModel, add_adapters, add_lora, train
from consumers.data import PadCollate, StoreDataset
from tests.conftest import SENTENCES
from tests.consumers_fixtures import consumer_corpus, entries, zoo  # noqa: F401


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def data(store):
    keys = [e.key for e in entries(store)]
    return keys, [i % 2 for i in range(len(keys))]


def logits(model, store):
    collate = PadCollate()
    batch = collate([{"states": e.states} for e in entries(store)])
    with torch.no_grad():
        return model.eval()(batch["hidden_states"], batch["attention_mask"]).logits


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_adapters_start_as_identity_and_only_they_train(zoo, family, tmp_path):
    store = zoo.store(family)
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    plain = logits(model, store)
    wrapped = add_adapters(model, bottleneck=8)
    assert len(wrapped) == 2 * 2  # two adapters in each of layers 2 and 3
    assert torch.equal(logits(model, store), plain)
    before = snapshot(model)
    keys, labels = data(store)
    train(model, store, keys, labels, epochs=2, batch_size=4, lr=1e-2)
    moved = changed(model, before)
    assert any(".adapter." in n for n in moved) and any(n.startswith("head.") for n in moved)
    assert all(".adapter." in n or n.startswith("head.") for n in moved), moved

    model.save(tmp_path / "saved")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(saved) and all(".adapter." in n or n.startswith("head.") for n in trainable)
    again = ReducedModel.load(tmp_path / "saved")
    assert torch.equal(logits(again, store), logits(model, store))


def test_lora_trains_only_lora_and_head(zoo, tmp_path):
    store = zoo.store("distilbert")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    plain = logits(model, store)
    add_lora(model, r=4)
    assert torch.equal(logits(model, store), plain)  # LoRA B starts at zero
    before = snapshot(model)
    keys, labels = data(store)
    train(model, store, keys, labels, epochs=2, batch_size=4, lr=1e-2)
    moved = changed(model, before)
    assert any("lora_B" in n for n in moved)
    assert all("lora_" in n or n.startswith("head.") for n in moved), moved
    model.save(tmp_path / "lora")
    again = ReducedModel.load(tmp_path / "lora")
    assert torch.equal(logits(again, store), logits(model, store))


def test_transformers_trainer_trains_a_reduced_model(zoo, tmp_path):
    from transformers import Trainer, TrainingArguments

    store = zoo.store("bert")
    model = ReducedModel.for_store(store, task="sequence", num_labels=2)
    add_adapters(model, bottleneck=8)
    before = snapshot(model)
    keys, labels = data(store)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=2,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=StoreDataset(store, keys, labels),
                      data_collator=PadCollate())
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    moved = changed(model, before)
    assert moved and all(".adapter." in n or n.startswith("head.") for n in moved)


def test_predict_computes_misses_and_writes_back(zoo, tmp_path):
    import shutil

    shutil.copytree(zoo.store("bert").location.url.removeprefix("file://"), tmp_path / "s")
    store = erstore.open(str(tmp_path / "s"))
    model = ReducedModel.for_store(store, task="sequence", num_labels=3)
    new = "A sentence that was never stored in this store."
    hit = model.predict([SENTENCES[0]], store=store)[0]
    entry = store.read([store.key_for(SENTENCES[0])])[0]
    with torch.no_grad():
        want = model(torch.from_numpy(entry.states)[None]).logits[0].numpy()
    np.testing.assert_array_equal(hit, want)
    miss = model.predict([new], store=store, write_back=True)[0]
    assert miss.shape == (3,)
    grown = erstore.open(str(tmp_path / "s"))
    assert grown.version == store.version + 1 and store.key_for(new) in grown
    np.testing.assert_array_equal(model.predict([new], store=grown)[0], miss)
    both = model.predict([new, SENTENCES[0]], store=store)  # padded together: rounding only
    np.testing.assert_allclose(np.stack(both), np.stack([miss, hit]), atol=1e-5)


def test_train_refuses_a_store_of_another_layer(zoo):
    from erstore.errors import IncompatibleStoreError

    layer2, layer4 = zoo.store("bert", layer=2), zoo.store("bert", layer=4)
    model = ReducedModel.for_store(layer2, task="sequence", num_labels=2)
    before = snapshot(model)
    keys, labels = data(layer4)
    with pytest.raises(IncompatibleStoreError, match="holds layer 4.*starts at layer 2"):
        train(model, layer4, keys, labels)
    with layer4.loader(labels=dict(zip(keys, labels)), batch_size=2) as batches:
        with pytest.raises(IncompatibleStoreError, match="holds layer 4"):
            train(model, batches)
    assert not changed(model, before)  # refused before any step
    assert train(model, layer2, *data(layer2), epochs=1)  # its own store still trains
