"""Heads: transformers' task heads load onto reduced models and give the same logits."""

from __future__ import annotations

import pytest
import torch

from consumers import ReducedModel, load_transformers_head
from erstore.errors import IncompatibleStoreError
from tests.consumers_fixtures import consumer_corpus, entries, ids_of, zoo  # noqa: F401

EAGER = {"deberta-v2": "eager", "mpnet": "eager"}


def hf_task_model(zoo, family: str, task: str, num_labels: int):
    import transformers as tf

    cls = {"sequence": tf.AutoModelForSequenceClassification, "token": tf.AutoModelForTokenClassification,
           "qa": tf.AutoModelForQuestionAnswering}[task]
    torch.manual_seed(7)
    kwargs = {"attn_implementation": EAGER[family]} if family in EAGER else {}
    if task != "qa":
        kwargs["num_labels"] = num_labels
    return cls.from_pretrained(zoo.model(family), **kwargs).eval()


@pytest.mark.parametrize("family,task", [
    ("bert", "sequence"), ("roberta", "sequence"), ("distilbert", "sequence"),
    ("deberta-v2", "sequence"), ("mpnet", "sequence"), ("bert", "token"), ("bert", "qa"),
    ("deberta-v2", "token"), ("roberta", "qa"),
])
def test_transformers_head_loads_and_matches(zoo, family, task):
    store = zoo.store(family)
    hf = hf_task_model(zoo, family, task, 3)
    reduced = ReducedModel.for_store(store, task=task, num_labels=3 if task != "qa" else 2).eval()
    loaded = load_transformers_head(reduced.head, hf, prefix=reduced.tail.hf_prefix)
    assert loaded
    with torch.no_grad():
        for e in entries(store)[:4]:
            ids = ids_of(e)
            want = hf(input_ids=ids, attention_mask=torch.ones_like(ids))
            got = reduced(torch.from_numpy(e.states)[None], torch.ones_like(ids))
            if task == "qa":
                assert torch.equal(got.start_logits, want.start_logits)
                assert torch.equal(got.end_logits, want.end_logits)
            else:
                assert torch.equal(got.logits, want.logits)


def test_head_shape_mismatch_is_refused(zoo):
    store = zoo.store("bert")
    hf = hf_task_model(zoo, "bert", "sequence", 3)
    reduced = ReducedModel.for_store(store, task="sequence", num_labels=2)
    with pytest.raises(IncompatibleStoreError, match="classifier.weight"):
        load_transformers_head(reduced.head, hf, prefix="bert")


def test_mlp_baseline_on_final_layer_store(zoo):
    from consumers import train

    store = zoo.store("bert", layer=4)
    model = ReducedModel.for_store(store, task="mlp", num_labels=2, hidden=16)
    assert model.tail.num_parameters() == 0  # hidden_states[N] is the final output: no layers
    keys = [e.key for e in entries(store)]
    labels = [i % 2 for i in range(len(keys))]
    losses = train(model, store, keys, labels, epochs=30, batch_size=8, lr=1e-2)
    assert losses[-1] < losses[0]
