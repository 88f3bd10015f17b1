"""Sentence embeddings (consumers.embed, PoolingHead) against sentence-transformers' own encode.

The packaged all-MiniLM-L6-v2 is a sentence-transformers folder (mean pooling, Normalize,
max_seq_length 256): a store built at layer 3 with the default options, a reduced model with an
embedding head, and `encode` must give SentenceTransformer.encode's vectors.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import erstore
from consumers import FullModel, PoolingHead, ReducedModel
from consumers.embed import pooling_config
from erstore.builder import BuildConfig, build
from erstore.corpus import default_corpus

from .conftest import SENTENCES, minilm_path, write_jsonl

LONG = " ".join(d.text for d in default_corpus(40)[20:40])  # ~900 tokens: truncated at 256
TEXTS = [d.text for d in default_corpus(20)] + [
    LONG, LONG[:1500], "Short.", "  Odd   white\tspace and ÜNICODE café — «quotes» 東京  ", "x " * 300,
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def sentence_model():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm_path()), device="cpu")


@pytest.fixture(scope="module")
def reference(sentence_model) -> np.ndarray:
    return sentence_model.encode(TEXTS, convert_to_numpy=True)


@pytest.fixture(scope="module")
def token_states(sentence_model):
    """sentence-transformers' Transformer module output (token embeddings) for a few texts."""
    texts = TEXTS[:6] + TEXTS[-3:]
    with torch.no_grad():
        return texts, sentence_model[0](dict(sentence_model.tokenize(texts)))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed")
    corpus = write_jsonl(folder / "c.jsonl", [{"text": t} for t in TEXTS])
    out = {}
    for dtype in ("float32", "float16"):
        [result] = build(BuildConfig(corpus=str(corpus), store=str(folder / dtype), dtype=dtype, layers=(3,),
                                     progress=False))
        out[dtype] = result.store
    return out


@pytest.fixture(scope="module")
def reduced(stores):
    """One reduced model (MiniLM layers 3..5) for every test; tests swap its head."""
    with erstore.open(stores["float32"]) as store:
        return ReducedModel.for_store(store, task="embedding")


@pytest.mark.minilm
def test_reduced_model_embeddings_equal_sentence_transformers(stores, reduced, reference):
    with erstore.open(stores["float32"]) as store:
        assert store.recipe.max_length == 256  # the model's max_seq_length, not min(512, ...)
        model = reduced
        head = model.head
        assert isinstance(head, PoolingHead)
        assert (head.modes, head.normalize, head.max_length) == (("mean",), True, 256)
        ours = model.encode(TEXTS, store=store)
        assert model._extractor is None  # every first window was read from the store
        by_key = model.encode(keys=[store.keys_for(t)[0] for t in TEXTS], store=store)
    ref = reference
    assert ours.shape == ref.shape == (len(TEXTS), 384)
    cos = cosines(ours, ref)
    assert cos.min() >= 1 - 1e-6, (cos.min(), np.abs(ours - ref).max())
    assert np.abs(ours - ref).max() < 1e-5
    np.testing.assert_array_equal(by_key, ours)


@pytest.mark.minilm
@pytest.mark.parametrize("mode", ["cls", "max", "mean_sqrt_len_tokens", "lasttoken", ["cls", "mean"]])
def test_pooling_modes_equal_sentence_transformers_pooling(stores, reduced, token_states, mode):
    from sentence_transformers.sentence_transformer.modules import Pooling

    texts, tokens = token_states
    with torch.no_grad():
        ref = Pooling(384, pooling_mode=mode)(dict(tokens))["sentence_embedding"].numpy()
    with erstore.open(stores["float32"]) as store:
        model = ReducedModel(reduced.tail, PoolingHead(384, mode=mode, normalize=False, max_length=256))
        ours = model.encode(texts, store=store)
    assert ours.shape == ref.shape
    assert cosines(ours, ref).min() >= 1 - 1e-6
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.minilm
def test_float16_store_and_longer_windows(stores, reduced, reference):
    ref = reference
    with erstore.open(stores["float16"]) as store:
        model = reduced  # the same model's states, stored in float16
        ours = model.encode(TEXTS, store=store)
        mean = model.encode(TEXTS, store=store, windows="mean")
    # fp16 states lose ~1e-3 per value (docs/consumers.md gives the measured cosine).
    assert cosines(ours, ref).min() > 1 - 1e-5  # measured: 1 - 1.2e-7, max abs diff 3.4e-5
    long = TEXTS.index(LONG)
    assert np.linalg.norm(mean, axis=1) == pytest.approx(1.0, abs=1e-6)
    assert cosines(mean[long:long + 1], ours[long:long + 1])[0] < 0.9999  # its other windows count too


def fake_sentence_folder(tmp_path, tiny_bert, *, pooling: dict, modules: list[str], max_seq_length=32):
    folder = tmp_path / "st-tiny"
    shutil.copytree(tiny_bert, folder)
    entries = [{"idx": i, "name": str(i), "path": "" if kind == "Transformer" else f"{i}_{kind}",
                "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(modules)]
    (folder / "modules.json").write_text(json.dumps(entries))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return folder


def test_build_defaults_to_the_sentence_transformers_length(tmp_path, tiny_bert, corpus):
    folder = fake_sentence_folder(tmp_path, tiny_bert, pooling={"pooling_mode": "cls"},
                                  modules=["Transformer", "Pooling"])
    assert pooling_config(folder) == {"mode": ["cls"], "normalize": False, "max_length": 32}
    [result] = build(BuildConfig(model=str(folder), corpus=str(corpus), store=str(tmp_path / "s"), layers=(2,),
                                 progress=False))
    with erstore.open(result.store) as store:
        assert store.recipe.max_length == 32
        model = ReducedModel.for_store(store, task="embedding")
        assert (model.head.modes, model.head.normalize, model.head.max_length) == (("cls",), False, 32)
        long_text = " ".join(SENTENCES * 6)  # the corpus' long document: many windows of 32 tokens
        expected = model.encode([long_text, SENTENCES[0]], store=store)
        assert expected.shape == (2, 32) and model._extractor is None  # first windows are stored
        loaded = ReducedModel.load(model.save(tmp_path / "saved"))
        assert loaded.head.config == model.head.config
        np.testing.assert_array_equal(loaded.encode([long_text, SENTENCES[0]], store=store), expected)
        full = FullModel.for_store(store, task="embedding")  # the whole model on token ids
        np.testing.assert_allclose(full.encode([long_text, SENTENCES[0]], store=store), expected, atol=1e-3)
    with pytest.warns(UserWarning, match="above the max_seq_length 32"):
        [longer] = build(BuildConfig(model=str(folder), corpus=str(corpus), store=str(tmp_path / "s64"),
                                     layers=(2,), progress=False, max_length=64))
    with erstore.open(longer.store) as store:
        # Windows of 64 tokens: the 32-token truncation the model embeds is computed, not read.
        got = model.encode([long_text, SENTENCES[0]], store=store)
        assert model._extractor is not None
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(erstore.InvalidInputError, match="write_back would add windows of 32 tokens"):
            model.encode([long_text], store=store, write_back=True)


def test_unsupported_sentence_transformers_pipelines_are_refused(tmp_path, tiny_bert):
    folder = fake_sentence_folder(tmp_path, tiny_bert, pooling={"pooling_mode_mean_tokens": True},
                                  modules=["Transformer", "Pooling", "Dense", "Normalize"])
    with pytest.raises(erstore.IncompatibleStoreError, match=r"modules \['Dense'\]"):
        pooling_config(folder)
    (folder / "modules.json").write_text("{not json")
    with pytest.raises(erstore.InvalidInputError, match="modules.json"):
        pooling_config(folder)
    assert pooling_config(tiny_bert) is None
    with pytest.raises(erstore.InvalidInputError, match="unknown pooling mode 'weightedmean'"):
        PoolingHead(8, mode="weightedmean")
