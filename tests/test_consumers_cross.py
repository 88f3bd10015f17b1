"""Cross-model recycling: a larger model's stored final-layer states feed a smaller model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from consumers import CrossModel, train
from erstore.errors import IncompatibleStoreError
from tests.conftest import SENTENCES, TOKENIZER_FILES, minilm_path
from tests.consumers_fixtures import consumer_corpus, zoo  # noqa: F401


def small_bert(folder, tokenizer_from=None):
    """A 2-layer BERT of hidden size 16 (the zoo's source model has 32), MiniLM's tokenizer."""
    import transformers as tf

    torch.manual_seed(1)
    config = tf.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=128)
    tf.BertModel(config).save_pretrained(folder)
    if tokenizer_from is None:
        for name in TOKENIZER_FILES:
            if (minilm_path() / name).exists():
                shutil.copy(minilm_path() / name, folder / name)
    else:
        tokenizer_from.save_pretrained(folder)
    return folder


def test_cross_model_learns_a_projection_of_the_stored_states(zoo, tmp_path):
    source = zoo.store("bert", layer=4)  # the final layer of a 4-layer, hidden-32 model
    model = CrossModel.for_store(source, str(small_bert(tmp_path / "small")), task="sequence", num_labels=2,
                                 hidden=8)
    labels = {source.key_for(s): i % 2 for i, s in enumerate(SENTENCES)}
    with source.loader(labels=labels, batch_size=8) as loader:
        batch = next(iter(loader))
    model.eval()
    with torch.no_grad():
        plain = model.small(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(model(**batch).logits, plain, rtol=0, atol=0)  # zero-initialised
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    with source.loader(labels=labels, batch_size=4, shuffle=True) as batches:
        losses = train(model, batches, epochs=3, lr=1e-2)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.projector.named_parameters())
    with torch.no_grad():
        trained = model(**batch).logits
        blank = model(**{**batch, "hidden_states": torch.zeros_like(batch["hidden_states"])}).logits
        shuffled = model(**{**batch, "hidden_states": batch["hidden_states"].flip(0)}).logits
    assert not torch.allclose(trained, blank, atol=1e-4) and not torch.allclose(trained, shuffled, atol=1e-4)
    predicted = model.predict(SENTENCES[:2], store=source)
    np.testing.assert_allclose(np.stack(predicted), trained[:2].numpy(), atol=1e-5)
    miss = model.predict(["A sentence the large model never stored."], store=source)[0]
    assert miss.shape == (2,) and np.isfinite(miss).all()

    tagger = CrossModel.for_store(source, str(tmp_path / "small"), task="token", num_labels=5)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    assert tagger(**unlabelled).logits.shape == (*batch["input_ids"].shape, 5)


def test_cross_model_refuses_a_different_tokenizer(zoo, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                                    cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder = small_bert(tmp_path / "other", tokenizer_from=other)
    source = zoo.store("bert", layer=4)
    with pytest.raises(IncompatibleStoreError, match="must share the tokenizer"):
        CrossModel.for_store(source, str(folder))
    import erstore

    erstore.build(model=str(folder), layers=(1,), corpus=str(zoo.corpus), store=str(tmp_path / "s"),
                  dtype="float32", progress=False, max_length=64)
    same = small_bert(tmp_path / "same")  # its own tokenizer matches; its store's does not
    with pytest.raises(IncompatibleStoreError, match="must share the tokenizer"):
        CrossModel.for_store(source, str(same), small_store=erstore.open(str(tmp_path / "s")))
