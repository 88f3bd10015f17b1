"""`erstore build` with a tiny random BERT: exactness, windows, pairs, dedup and skipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import erstore
from erstore.builder import BuildConfig, build, length_batches
from tests.conftest import SENTENCES, write_jsonl


def run(model, corpus, store, **kw):
    return build(BuildConfig(model=str(model), corpus=str(corpus), store=str(store), dtype="float32",
                             max_length=64, stride=16, progress=False, **kw))


def reference_states(model_dir, ids, layer, token_type_ids=None):
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        inputs = {"input_ids": torch.tensor([ids])}
        if token_type_ids is not None:
            inputs["token_type_ids"] = torch.tensor([token_type_ids])
        return model(**inputs, output_hidden_states=True).hidden_states[layer][0].numpy()


@pytest.mark.parametrize("layer", [0, 1, 2, 4])
def test_stored_states_equal_hidden_states_bit_exact(tiny_bert, corpus, tmp_path, layer):
    [result] = run(tiny_bert, corpus, tmp_path / "s", layers=(layer,))
    assert result.version.version == 1
    with erstore.open(tmp_path / "s") as store:
        tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
        for text in SENTENCES[:4]:
            ids = tok(text)["input_ids"]
            states, stored_ids = store.get(store.key_for(text), with_token_ids=True)
            assert stored_ids.tolist() == ids
            assert states.tobytes() == reference_states(tiny_bert, ids, layer).tobytes()


def test_long_documents_become_overlapping_windows(tiny_bert, corpus, tmp_path):
    run(tiny_bert, corpus, tmp_path / "s", layers=(2,), id_field="id")
    with erstore.open(tmp_path / "s") as store:
        keys = store.windows("long")
        assert len(keys) > 1
        entries = store.read(keys)
        assert all(len(e.token_ids) <= 64 for e in entries)
        # consecutive windows overlap by `stride` tokens (before the trailing [SEP])
        first, second = entries[0].token_ids.tolist(), entries[1].token_ids.tolist()
        assert first[-1 - 16 : -1] == second[1 : 1 + 16]
        assert store.keys_for(" ".join(SENTENCES * 6)) == keys
        assert store.windows("d0") == [store.key_for(SENTENCES[0])]


def test_text_pairs_store_segment_boundaries(tiny_bert, tmp_path):
    corpus = write_jsonl(tmp_path / "qa.jsonl", [
        {"q": "What is stored?", "c": "Hidden states of layer k are stored once."},
        {"q": "Who trains?", "c": "Teams train reduced models on the stored states."},
    ])
    run(tiny_bert, corpus, tmp_path / "s", layers=(2,), text_field="q", pair_field="c")
    with erstore.open(tmp_path / "s") as store:
        key = store.key_for("What is stored?", "Hidden states of layer k are stored once.")
        [entry] = store.read([key])
        ids = entry.token_ids.tolist()
        assert entry.boundary == ids.index(102) + 1  # second segment starts after the first [SEP]
        types = [0] * entry.boundary + [1] * (len(ids) - entry.boundary)
        assert entry.states.tobytes() == reference_states(tiny_bert, ids, 2, types).tobytes()
        assert key != store.key_for_ids(ids)  # the boundary is part of the key


def test_rebuild_computes_nothing_and_second_corpus_only_the_new(tiny_bert, corpus, tmp_path):
    [first] = run(tiny_bert, corpus, tmp_path / "s", layers=(2,))
    [again] = run(tiny_bert, corpus, tmp_path / "s", layers=(2,))
    assert again.computed == 0 and again.version is None
    more = write_jsonl(tmp_path / "more.jsonl", [{"text": SENTENCES[0]}, {"text": "A brand new sentence."}])
    [second] = run(tiny_bert, more, tmp_path / "s", layers=(2,))
    assert second.computed == 1 and second.version.version == 2
    assert second.version.totals.sequences == first.version.totals.sequences + 1


def test_duplicate_documents_are_computed_once(tiny_bert, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": SENTENCES[0]}] * 5 + [{"text": SENTENCES[1]}])
    [result] = run(tiny_bert, corpus, tmp_path / "s", layers=(1,))
    assert result.computed == 2 and result.version.added.sequences == 2


def test_several_layers_from_one_pass(tiny_bert, corpus, tmp_path):
    results = run(tiny_bert, corpus, tmp_path / "s", layers=(1, 3))
    assert [r.layer for r in results] == [1, 3]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    ids = tok(SENTENCES[2])["input_ids"]
    for k in (1, 3):
        with erstore.open(tmp_path / "s" / f"layer-{k}") as store:
            assert store.recipe.layer == k
            assert store.get(store.key_for(SENTENCES[2])).tobytes() == reference_states(tiny_bert, ids, k).tobytes()


def test_batches_hold_equal_lengths_longest_first():
    todo = [(str(i), [0] * n, 0, [1]) for i, n in enumerate([3, 5, 3, 5, 5, 4])]
    batches = length_batches(todo, 2)
    assert [[len(t[1]) for t in b] for b in batches] == [[5, 5], [5], [4], [3, 3]]


def test_dtypes_are_recorded_and_cast(tiny_bert, corpus, tmp_path):
    build(BuildConfig(model=str(tiny_bert), corpus=str(corpus), store=str(tmp_path / "s"), dtype="bfloat16",
                      max_length=64, progress=False, layers=(2,)))
    with erstore.open(tmp_path / "s") as store:
        assert store.recipe.codec["dtype"] == "bfloat16"
        states = store.get(store.key_for(SENTENCES[0]))
        assert str(states.dtype) == "bfloat16"
        tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
        ref = reference_states(tiny_bert, tok(SENTENCES[0])["input_ids"], 2)
        assert np.abs(states.astype(np.float32) - ref).max() <= np.abs(ref).max() * 2**-8


class FirstWindowOnly:
    """A real tokenizer that, like tokenizers 0.23.1-0.23.2 (huggingface/tokenizers#2091), keeps
    only the first window of a truncated long text."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        if kwargs.get("return_overflowing_tokens"):
            out["input_ids"] = out["input_ids"][:1]
        return out


def test_a_tokenizer_that_loses_overflow_windows_is_refused_before_any_compute(tiny_bert):
    from erstore.tokenize import Windower, load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(str(tiny_bert))
    fingerprint = tokenizer_fingerprint(tokenizer)
    windower = Windower(tokenizer, 32, 8)
    assert tokenizer_fingerprint(tokenizer) == fingerprint  # the check leaves no state behind
    assert len(windower.windows("word " * 200)) > 1
    with pytest.raises(erstore.ErstoreError, match=r"tokenizers#2091.*tokenizers>=0\.23\.3"):
        Windower(FirstWindowOnly(tokenizer), 32, 8)
