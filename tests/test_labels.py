"""erstore.labels: joins by key/doc/text and sub-token alignment on the real MiniLM tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import erstore
from erstore.errors import InvalidInputError
from erstore.labels import IGNORE, qa_labels, sequence_labels, token_labels


def test_sequence_labels_by_key_doc_and_text(read_store, tmp_path, label_rows):
    SENTENCES = label_rows["sentences"]
    store = erstore.open(read_store)
    long_keys = store.windows("long")
    assert len(long_keys) > 1

    by_doc = sequence_labels(store, {"d0": 1, "long": 2}, by="doc")
    assert set(by_doc) == {*store.windows("d0"), *long_keys}
    assert all(by_doc[k] == {"labels": 2} for k in long_keys)

    by_text = sequence_labels(store, {SENTENCES[0]: 1, " ".join(SENTENCES * 6): 2}, by="text")
    assert by_text == by_doc

    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"id": i, "label": lab}) + "\n" for i, lab in [("d0", "pos"), ("d1", "neg")]))
    from_file = sequence_labels(store, path, by="doc", label_to_id={"neg": 0, "pos": 1})
    assert from_file == {store.key_for(SENTENCES[0]): {"labels": 1}, store.key_for(SENTENCES[1]): {"labels": 0}}

    key = store.key_for(SENTENCES[2])
    assert sequence_labels(store, [{"key": key, "label": 5}]) == {key: {"labels": 5}}
    with pytest.raises(KeyError):
        sequence_labels(store, {"0" * 32: 1})
    with pytest.raises(InvalidInputError, match="different labels"):
        sequence_labels(store, [{"text": SENTENCES[0], "label": 1}, {"text": SENTENCES[0], "label": 2}], by="text")


def test_ner_labels_match_the_transformers_recipe(read_store, label_rows):
    NER_ROWS = label_rows["ner"]
    """For texts that fit one window, compare with word_ids() of is_split_into_words encoding."""
    store = erstore.open(read_store)
    labels = token_labels(store, NER_ROWS[:2])
    tokenizer = store._tokenizer.tokenizer
    for row in NER_ROWS[:2]:
        (key,) = store.keys_for(" ".join(row["tokens"]))
        enc = tokenizer(row["tokens"], is_split_into_words=True)
        expected, previous = [], None
        for w in enc.word_ids():
            expected.append(IGNORE if w is None or w == previous else row["ner_tags"][w])
            previous = w
        assert store.get(key, with_token_ids=True)[1].tolist() == enc["input_ids"]
        assert labels[key]["labels"].tolist() == expected
        assert sum(v != IGNORE for v in expected) == len(row["tokens"])  # one label per word
        assert len(enc["input_ids"]) > len(row["tokens"]) + 2  # some words have several sub-tokens


def test_ner_labels_across_windows_of_a_long_document(read_store, label_rows):
    NER_ROWS = label_rows["ner"]
    store = erstore.open(read_store)
    row = NER_ROWS[2]
    labels = token_labels(store, [row])
    keys = store.windows("n2")
    assert len(keys) > 1 and set(keys) <= set(labels)
    tokenizer = store._tokenizer.tokenizer
    word_label = dict(zip(row["tokens"], row["ner_tags"]))
    for key in keys:
        ids = store.get(key, with_token_ids=True)[1].tolist()
        lab = labels[key]["labels"]
        assert len(lab) == len(ids) and lab[0] == IGNORE and lab[-1] == IGNORE  # [CLS], [SEP]
        for tok_id, value in zip(ids, lab.tolist()):
            token = tokenizer.convert_ids_to_tokens(tok_id)
            if value != IGNORE:
                assert not token.startswith("##")
                assert value == next(v for w, v in word_label.items() if w.lower().startswith(token))
            elif token not in ("[CLS]", "[SEP]"):
                assert token.startswith("##")  # every word start in the window is labelled


def test_qa_positions_point_at_the_answer(qa_store, label_rows):
    QA_ROWS = label_rows["qa"]
    store = erstore.open(qa_store)
    labels = qa_labels(store, QA_ROWS)
    tokenizer = store._tokenizer.tokenizer
    for row in QA_ROWS:
        keys = store.windows(row["id"])
        hits = 0
        for key in keys:
            ids = store.get(key, with_token_ids=True)[1].tolist()
            s, e = labels[key]["start_positions"], labels[key]["end_positions"]
            if (s, e) == (0, 0):
                continue
            hits += 1
            assert tokenizer.decode(ids[s : e + 1]) == row["answers"]["text"][0].lower()
        assert hits >= 1
    long_windows = store.windows("q1")
    assert len(long_windows) > 2
    assert any(labels[k] == {"start_positions": 0, "end_positions": 0} for k in long_windows)


def test_token_labels_flow_through_the_loader(read_store, label_rows):
    NER_ROWS = label_rows["ner"]
    store = erstore.open(read_store)
    labels = token_labels(store, NER_ROWS)
    with store.loader(labels=labels, batch_size=8) as loader:
        batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == len(labels)
    for batch in batches:
        lab, mask = batch["labels"], batch["attention_mask"]
        assert lab.shape == mask.shape and lab.dtype.is_floating_point is False
        assert (lab[mask == 0] == IGNORE).all()
        for i, key in enumerate(batch["keys"]):
            n = int(mask[i].sum())
            assert lab[i, :n].tolist() == labels[key]["labels"].tolist()


def test_ner_rejects_mismatched_rows(read_store, label_rows):
    NER_ROWS = label_rows["ner"]
    store = erstore.open(read_store)
    with pytest.raises(InvalidInputError, match="2 words but 1 labels"):
        token_labels(store, [{"tokens": ["a", "b"], "ner_tags": [0]}])
    with pytest.raises(InvalidInputError, match="label_to_id"):
        token_labels(store, [{"tokens": NER_ROWS[0]["tokens"], "ner_tags": ["O"] * 8}])
    np.testing.assert_array_equal(
        token_labels(store, [{"tokens": NER_ROWS[0]["tokens"], "ner_tags": ["O"] * 8}], label_to_id={"O": 0})[
            store.key_for(" ".join(NER_ROWS[0]["tokens"]))]["labels"][1:-1].clip(min=0),
        0)


def test_label_rows_from_every_corpus_format(read_store, tmp_path, label_rows):
    """Label files in JSONL, CSV, Parquet and a datasets folder give the same examples as the rows
    themselves (nested NER tags from Parquet/datasets keep their list type)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = erstore.open(read_store)
    seq_rows = [{"id": "d0", "label": 1}, {"id": "d1", "label": 0}]
    expected = sequence_labels(store, seq_rows, by="doc")
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seq_rows))
    (tmp_path / "l.csv").write_text("id,label\nd0,1\nd1,0\n")
    pq.write_table(pa.Table.from_pylist(seq_rows), tmp_path / "l.parquet")
    for name in ("l.jsonl", "l.csv", "l.parquet"):
        assert sequence_labels(store, tmp_path / name, by="doc") == expected, name
    assert sequence_labels(store, pa.Table.from_pylist(seq_rows), by="doc") == expected

    ner = label_rows["ner"][:2]
    want = token_labels(store, ner)
    datasets.Dataset.from_list(ner).save_to_disk(str(tmp_path / "ner-ds"))
    pq.write_table(pa.Table.from_pylist(ner), tmp_path / "ner.parquet")
    for source in (tmp_path / "ner-ds", tmp_path / "ner.parquet"):
        got = token_labels(store, source)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k]["labels"], want[k]["labels"]) for k in want), source

    (tmp_path / "l.txt").write_text("d0\n")
    with pytest.raises(InvalidInputError, match="plain text"):
        sequence_labels(store, tmp_path / "l.txt", by="doc")
    (tmp_path / "bad.jsonl").write_text('{"id": "d0", "label": 1}\n[1, 2]\n')
    with pytest.raises(InvalidInputError, match=r"bad\.jsonl:2: a label row must be a JSON object"):
        sequence_labels(store, tmp_path / "bad.jsonl", by="doc")
    (tmp_path / "bad2.jsonl").write_text('{"id": "d0", "label": 1}\n{oops\n')
    with pytest.raises(InvalidInputError, match=r"bad2\.jsonl:2: malformed JSON"):
        sequence_labels(store, tmp_path / "bad2.jsonl", by="doc")
