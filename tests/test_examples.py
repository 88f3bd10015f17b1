"""Labelled datasets as examples: duplicates, pre-tokenized words, per-word and answer predictions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import erstore
from consumers import FullModel, ReducedModel, train
from consumers.decode import best_answer, word_logits
from consumers.metrics import entity_f1, squad_scores
from consumers.sweep import Budget, prepare, score
from erstore.errors import InvalidInputError, KeyNotFoundError
from erstore.labels import (
    sequence_examples,
    sequence_labels,
    token_examples,
    token_labels,
)
from tests.conftest import NER_ROWS, QA_ROWS, write_jsonl

TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC"]
# Annotators disagree on an identical sentence; two word splits tokenize to the same ids.
CONFLICT = [
    {"id": "a", "tokens": ["Marie", "Curie", "visited", "Paris", "."], "tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]},
    {"id": "b", "tokens": ["Marie", "Curie", "visited", "Paris", "."], "tags": ["B-PER", "I-PER", "O", "B-ORG", "O"]},
    {"id": "c", "tokens": ["I'm", "in", "Zurich"], "tags": ["O", "O", "B-LOC"]},
    {"id": "d", "tokens": ["I", "'m", "in", "Zurich"], "tags": ["O", "O", "O", "B-ORG"]},
    {"id": "e", "tokens": ["Anthropic", "hired", "Marie", "Curie", "."], "tags": ["B-ORG", "O", "B-PER", "I-PER", "O"]},
]
LONG = {"id": "long", "tokens": NER_ROWS[2]["tokens"], "tags": [TAGS[t] for t in NER_ROWS[2]["ner_tags"]]}
ROWS = [*CONFLICT, LONG]


@pytest.fixture(scope="module")
def stores(tiny_bert, tmp_path_factory):
    """The same rows built twice: from a words field (pre-split) and from the words joined by spaces."""
    root = tmp_path_factory.mktemp("examples")
    words = write_jsonl(root / "words.jsonl", [{"id": r["id"], "tokens": r["tokens"]} for r in ROWS])
    text = write_jsonl(root / "text.jsonl", [{"id": r["id"], "text": " ".join(r["tokens"])} for r in ROWS])
    common = {"model": str(tiny_bert), "layers": (2,), "dtype": "float32", "progress": False, "max_length": 32,
                  "id_field": "id"}
    erstore.build(corpus=str(words), store=str(root / "words"), words_field="tokens", **common)
    erstore.build(corpus=str(text), store=str(root / "text"), **common)
    return erstore.open(str(root / "words")), erstore.open(str(root / "text"))


def test_word_input_gives_the_windows_and_labels_of_joined_text(stores):
    words, text = stores
    assert len(words.windows("long")) > 1  # several overlapping windows
    for r in ROWS:
        assert words.windows(r["id"]) == text.windows(r["id"])  # WordPiece: pre-split == joined
    assert sorted(words) == sorted(text)
    ids = {t: i for i, t in enumerate(TAGS)}
    pre = token_examples(words, ROWS, labels_field="tags", label_to_id=ids)
    joined = [{**r, "text": " ".join(r["tokens"])} for r in ROWS]
    aligned = token_examples(text, joined, labels_field="tags", label_to_id=ids, text_field="text")
    assert pre.keys == aligned.keys and len(pre) > len(ROWS)
    for a, b in zip(pre, aligned):
        np.testing.assert_array_equal(a.fields["labels"], b.fields["labels"])
        assert a.word_positions == b.word_positions and a.row == b.row
    # Every word of a row is labelled exactly once over its windows' first sub-tokens, except words
    # cut by a window edge; in the long row each word has its first sub-token in some window.
    for n, r in enumerate(ROWS):
        seen = set()
        for e in (e for e in pre if e.row == n):
            seen |= {w for w, p in enumerate(e.word_positions) if p >= 0}
        assert seen == set(range(len(r["tokens"])))


def test_duplicates_with_conflicting_labels_are_separate_examples(stores):
    store = stores[0]
    ids = {t: i for i, t in enumerate(TAGS)}
    examples = token_examples(store, CONFLICT, labels_field="tags", label_to_id=ids)
    assert [e.row for e in examples] == [0, 1, 2, 3, 4] and examples.rows == 5
    assert examples[0].key == examples[1].key and examples[2].key == examples[3].key
    assert not np.array_equal(examples[0].fields["labels"], examples[1].fields["labels"])
    with pytest.raises(InvalidInputError, match=r"rows 0 and 1 .*'Marie Curie visited Paris \.'"):
        token_labels(store, CONFLICT, labels_field="tags", label_to_id=ids)
    text = [{"text": "Marie Curie visited Paris .", "label": 1}, {"text": "Marie Curie visited Paris .", "label": 0}]
    assert len(sequence_examples(store, text, by="text")) == 2
    with pytest.raises(InvalidInputError, match="rows 0 and 1"):
        sequence_labels(store, text, by="text")

    # The loader visits every example once per epoch, shuffled, across ranks and after a resume.
    want = Counter((e.key, tuple(e.fields["labels"].tolist())) for e in examples)

    def seen(batches):
        out = Counter()
        for b in batches:
            for i, key in enumerate(b["keys"]):
                n = int(b["attention_mask"][i].sum())
                out[(key, tuple(b["labels"][i, :n].tolist()))] += 1
        return out

    with store.loader(labels=examples, batch_size=2, shuffle=True, seed=3) as loader:
        assert seen(next(iter(loader)) for _ in range(len(loader))) == want
    shares = Counter()
    for rank in (0, 1):
        with store.loader(labels=examples, batch_size=1, shuffle=True, seed=3, rank=rank, world_size=2,
                          drop_last=False) as loader:
            it = iter(loader)
            shares += seen(next(it) for _ in range(len(loader)))
    assert set(shares) == set(want) and sum(shares.values()) == 6  # 5 padded to a multiple of 2
    with store.loader(labels=examples, batch_size=2, shuffle=True, seed=3) as loader:
        it = iter(loader)
        first = [next(it)]
        state = loader.state_dict()
    with store.loader(labels=examples, batch_size=2, shuffle=True, seed=3) as loader:
        loader.load_state_dict(state)
        it = iter(loader)
        rest = [next(it) for _ in range(len(loader) - 1)]
    assert seen(first) + seen(rest) == want

    # Training and scoring: each row is its own example and is scored as itself.
    data = prepare(store, "ner", CONFLICT, CONFLICT, Budget(min_steps=0, epochs=1), tags_field="tags")
    assert len(data.train) == 5 and data.dev.rows == 5 and len(data.dev_keys) == 3
    assert data.metric_name == "entity F1" and data.gold[0] != data.gold[1]
    model = ReducedModel.for_store(store, task="token", num_labels=data.num_labels)
    losses = train(model, store, data.train, epochs=1, batch_size=5)
    assert len(losses) == 1
    logits = {k: v[0] for k, v in zip(data.dev_keys, model.window_logits(
        [[(e.token_ids.tolist(), e.boundary)] for e in store.read(data.dev_keys)], store=store))}
    got, _ = score(data, logits)
    # Rows 0 and 1 share a window, so they get the same prediction: both cannot be right.
    pred = model.predict_words([r["tokens"] for r in CONFLICT], store=store, label_names=data.id_to_label)
    assert pred[0] == pred[1] and got == pytest.approx(entity_f1([r["tags"] for r in CONFLICT], pred))


def test_errors_name_the_row_and_show_the_text(stores):
    store = stores[0]
    with pytest.raises(InvalidInputError, match=r"row 1: 2 words but 1 labels \('a b'\)"):
        token_examples(store, [CONFLICT[0] | {"ner_tags": [0] * 5}, {"tokens": ["a", "b"], "ner_tags": [0]}])
    with pytest.raises(InvalidInputError, match=r"row 0: word 'Rome' is not in the text .*'Marie"):
        token_examples(store, [{"tokens": ["Rome"], "ner_tags": [0], "text": "Marie Curie visited Paris ."}],
                       text_field="text")
    with pytest.raises(KeyNotFoundError, match=r"row 0 \('Nowhere stored'\)"):
        token_examples(store, [{"tokens": ["Nowhere", "stored"], "ner_tags": [0, 0]}])


def test_per_word_predictions_follow_the_first_sub_token(stores):
    store = stores[0]
    torch.manual_seed(0)
    model = ReducedModel.for_store(store, task="token", num_labels=len(TAGS))
    texts = [r["tokens"] for r in ROWS]
    per_word = model.predict_words(texts, store=store, logits=True)
    tags = model.predict_words(texts, store=store, label_names=TAGS)
    examples = token_examples(store, ROWS, labels_field="tags", label_to_id={t: i for i, t in enumerate(TAGS)})
    windows = model.predict([" ".join(t) for t in texts], store=store)
    for n, (words, values) in enumerate(zip(texts, per_word)):
        assert values.shape == (len(words), len(TAGS)) and len(tags[n]) == len(words)
        assert tags[n] == [TAGS[i] for i in values.argmax(-1)]
        mine = [e for e in examples if e.row == n]
        for w in range(len(words)):
            # The word's logits are its first sub-token's, in one of the windows that hold it.
            options = [windows[n][e.window][e.word_positions[w]] for e in mine if e.word_positions[w] >= 0]
            assert any(np.allclose(values[w], o, atol=1e-5) for o in options)
    # A word in two windows is read where it has the most context (constructed numbers).
    a, b = np.zeros((6, 2)), np.zeros((6, 2))
    a[4], b[1] = [1, 0], [0, 1]
    assert word_logits([a, b], [[4], [1]], 1).tolist() == [[1.0, 0.0]]  # context 1 vs 1: the first
    a[4], b[2] = [1, 0], [0, 1]
    assert word_logits([a, b], [[4], [2]], 1).tolist() == [[0.0, 1.0]]  # context 1 vs 2
    # Strings are split on whitespace; a full fine-tuning baseline predicts per word too.
    assert model.predict_words(["Marie Curie visited Paris ."], store=store) == \
        model.predict_words([CONFLICT[0]["tokens"]], store=store)
    full = FullModel.for_store(store, task="ner", num_labels=len(TAGS), seed=0)
    assert [len(t) for t in full.predict_words(texts, store=store)] == [len(t) for t in texts]


def test_qa_answers_as_text_with_offsets(qa_store):
    store = erstore.open(str(qa_store))
    torch.manual_seed(0)
    model = ReducedModel.for_store(store, task="qa", num_labels=2)
    answers = model.predict_answers([r["question"] for r in QA_ROWS], [r["context"] for r in QA_ROWS], store=store)
    for row, a in zip(QA_ROWS, answers):
        assert a["text"] and row["context"][a["start"]: a["end"]] == a["text"]
    # best_answer on constructed logits: the span with the best start+end score, as character offsets.
    w = store._tokenizer.detailed_windows([QA_ROWS[0]["question"]], [QA_ROWS[0]["context"]])[0][0]
    logits = np.full((len(w.ids), 2), -9.0)
    gold = next(i for i, (off, s) in enumerate(zip(w.offsets, w.sequence_ids)) if s == 1 and off[0] == 43)
    logits[gold, :] = 9.0
    got = best_answer([logits], [w], QA_ROWS[0]["context"])
    assert (got["text"], got["start"], got["end"]) == ("Paris", 43, 48)
    assert squad_scores([got["text"]], [QA_ROWS[0]["answers"]["text"]]) == (100.0, 100.0)


def test_cli_build_takes_a_words_field(tiny_bert, stores, tmp_path):
    from click.testing import CliRunner

    from erstore.cli import main

    corpus = write_jsonl(tmp_path / "w.jsonl", [{"id": r["id"], "words": r["tokens"]} for r in ROWS])
    args = ["build", "--model", str(tiny_bert), "--layer", "2", "--dtype", "float32", "--max-length", "32",
            "--id-field", "id", "--quiet", "--corpus", str(corpus)]
    ok = CliRunner().invoke(main, [*args, "--words-field", "words", "--store", str(tmp_path / "s")])
    assert ok.exit_code == 0, ok.output
    built = erstore.open(str(tmp_path / "s"))
    assert sorted(built) == sorted(stores[0]) and built.windows("long") == stores[0].windows("long")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "words": "not a list"}])
    fail = CliRunner().invoke(main, [*args[:-1], str(bad), "--words-field", "words", "--store", str(tmp_path / "b")])
    assert fail.exit_code != 0 and "bad.jsonl:1" in fail.output and "list of non-empty strings" in fail.output
    assert not (tmp_path / "b" / "versions").exists()


def test_qa_examples_one_per_window_and_unattachable_answers(qa_store):
    from erstore.labels import qa_examples

    store = erstore.open(str(qa_store))
    examples = qa_examples(store, QA_ROWS + QA_ROWS[:1])  # a duplicate row stays its own example
    assert examples.rows == 3 and [e.row for e in examples].count(2) == [e.row for e in examples].count(0)
    assert sum(e.fields["start_positions"] > 0 for e in examples if e.row == 1) >= 1
    with store.loader(labels=examples, batch_size=4) as loader:
        assert sum(len(b["keys"]) for b in loader) == len(examples)
    whole = dict(QA_ROWS[1], answers={"text": [QA_ROWS[1]["context"]], "answer_start": [0]})
    with pytest.raises(InvalidInputError, match=r"row 1: the answer .* fits in none of the row's windows"):
        qa_examples(store, [QA_ROWS[0], whole])
    moved = dict(QA_ROWS[0], answers={"text": ["Paris"], "answer_start": [3]})
    with pytest.raises(InvalidInputError, match=r"row 0: the answer 'Paris' is not at answer_start 3"):
        qa_examples(store, [moved])


def test_full_baseline_trains_through_the_same_loop(stores):
    store = stores[0]
    ids = {t: i for i, t in enumerate(TAGS)}
    examples = token_examples(store, ROWS, labels_field="tags", label_to_id=ids)
    full = FullModel.for_store(store, task="token", num_labels=len(TAGS), seed=0)
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    losses = train(full, store, examples, epochs=2, batch_size=4, lr=1e-3)
    assert len(losses) == 2 * -(-len(examples) // 4)  # one loss per step, every example each epoch
    moved = {n for n, p in full.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("base.embeddings.") for n in moved) and any("head" in n for n in moved)
    # Its loss is the reduced model's token loss on the whole model's last hidden state.
    from consumers.full import token_batches

    batch = next(iter(token_batches(store, examples.keys[:3], [e.fields["labels"] for e in examples][:3],
                                    batch_size=3)))
    with torch.no_grad():
        out = full(**batch)
        h = full.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"]).last_hidden_state
        logits = full.reduced.head(h, batch["attention_mask"])
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, len(TAGS)), batch["labels"].reshape(-1),
                                                 ignore_index=-100)
    assert torch.allclose(out.loss, want)
