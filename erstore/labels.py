"""Joining labels to stored sequences: a labelled dataset is a list of examples.

Each row of the user's data becomes one `Example` per stored window it covers (one for a short
text, several for a long document), holding the window's key, the label fields for that window
and the row number. Several examples may point at the same stored window with different labels
(identical sentences tagged differently, word splits that tokenize alike): each is trained and
scored as itself, so an epoch visits every row of the user's data once.

- `sequence_examples`: one label per document (classification/regression); every window of the
  document gets it. Join by key, by document id (`store.windows(id)`) or by text (`store.keys_for`).
- `token_examples`: word-level tags (NER). The words are tokenized with `is_split_into_words`,
  exactly as `erstore build --words-field` stores them (or the row's `text_field`, aligned by
  character offsets); the first sub-token of each word gets the word's label, other sub-tokens
  and special tokens get -100 (transformers' token-classification recipe). A window that starts
  inside a word labels none of that word's sub-tokens. Each example also records, per word, the
  position of its first sub-token in the window (-1 if absent), for per-word predictions.
- `qa_examples`: SQuAD-style answers (character spans in the context of a question/context pair)
  become `start_positions`/`end_positions`; windows without the whole answer point at 0 (the
  [CLS] token), as in transformers' QA examples.

`Examples` goes straight to `store.loader(labels=...)` / `store.dataset(labels=...)`. The older
`sequence_labels` / `token_labels` / `qa_labels` return `{key: fields}` and therefore need the
labels of identical windows to agree. Errors name the row number and show its text.
Not here: label vocabularies beyond an explicit `label_to_id` mapping, character-span entities.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from erstore import corpus_files
from erstore.errors import InvalidInputError, KeyNotFoundError
from erstore.store import Store
from erstore.tokenize import Window, Windower

IGNORE = -100
Rows = str | os.PathLike[str] | Iterable[Mapping[str, Any]]


@dataclass(frozen=True)
class Example:
    """One labelled window of one row: `fields` are added to the loader's item for `key`."""

    key: str
    fields: Mapping[str, Any]
    row: int  # index of the row in the user's data (0-based)
    window: int = 0  # which window of the row's text
    word_positions: tuple[int, ...] | None = None  # token tasks: per word, its first sub-token here or -1


class Examples(Sequence[Example]):
    """The examples of a labelled dataset, in row order; `texts[row]` is each row's text (for messages)."""

    def __init__(self, items: Iterable[Example], texts: Sequence[str]):
        self.items, self.texts = list(items), list(texts)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: Any) -> Any:
        return self.items[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.items)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.items]

    @property
    def fields(self) -> list[dict[str, Any]]:
        return [dict(e.fields) for e in self.items]

    @property
    def rows(self) -> int:
        return len(self.texts)

    def by_row(self) -> list[list[int]]:
        """For each row, the indices of its examples (its windows, in order)."""
        out: list[list[int]] = [[] for _ in self.texts]
        for i, e in enumerate(self.items):
            out[e.row].append(i)
        return out

    def keys_and_fields(self) -> tuple[list[str], list[dict[str, Any]]]:
        """What `erstore.torchdata.StoreDataset(labels=examples)` uses: one item per example."""
        return self.keys, self.fields

    def to_mapping(self) -> dict[str, dict[str, Any]]:
        """`{key: fields}`; raises if two rows give one stored window different labels."""
        out: dict[str, dict[str, Any]] = {}
        first: dict[str, int] = {}
        for e in self.items:
            old = out.get(e.key)
            if old is not None and not all(np.array_equal(old[k], v) for k, v in e.fields.items()):
                a, b = first[e.key], e.row
                raise InvalidInputError(
                    f"rows {a} and {b} give the same stored window {e.key} different labels "
                    f"(row {a}: {_show(self.texts[a])}; row {b}: {_show(self.texts[b])}): a "
                    "{key: label} mapping holds one label per window; use the *_examples functions "
                    "(each row stays its own example) or fix the label rows")
            out.setdefault(e.key, dict(e.fields))
            first.setdefault(e.key, e.row)
        return out


def read_rows(data: Rows) -> list[Mapping[str, Any]]:
    """Rows from a file, folder or glob in any corpus format but plain text (JSONL, CSV/TSV,
    Parquet, Arrow, a `datasets` save_to_disk folder; compressed too), or the given iterable of
    dicts, `datasets.Dataset` or pyarrow Table. Columnar files keep their column types (CSV's
    are inferred)."""
    if not isinstance(data, (str, os.PathLike)):
        return data.to_pylist() if hasattr(data, "to_pylist") else list(data)
    rows: list[Mapping[str, Any]] = []
    for f in corpus_files.discover(data):
        if f.format == "text":
            raise InvalidInputError(f"{f.path}: labels need named fields, which plain text has not; "
                                    "give them as JSONL, CSV, Parquet or a datasets folder")
        for block in corpus_files.read(f, None):
            if block.records is not None:
                for i, rec in enumerate(block.records):
                    if not isinstance(rec, Mapping):
                        raise InvalidInputError(f"{block.location(i)}: a label row must be a JSON object, got "
                                                f"{type(rec).__name__}; write one object per line")
                rows += block.records
            else:
                cols = {name: col.to_pylist() for name, col in (block.columns or {}).items()}
                rows += [dict(zip(cols, values)) for values in zip(*cols.values())]
    return rows


# -- sequence labels ------------------------------------------------------------------------------
def sequence_examples(store: Store, data: Mapping[str, Any] | Rows, *, by: str = "key", field: str = "label",
                      id_field: str = "id", text_field: str = "text", pair_field: str | None = None,
                      label_to_id: Mapping[Any, int] | None = None) -> Examples:
    """Document labels -> one example {"labels": label} per stored window of each row.

    `data` is a mapping (key, document id or text -> label) or rows/JSONL with `field` and the
    join column (`id_field` for by="doc", `text_field` [+ `pair_field`] for by="text", "key").
    """
    if by not in ("key", "doc", "text"):
        raise InvalidInputError(f"by must be 'key', 'doc' or 'text', got {by!r}")
    if isinstance(data, Mapping):
        triples = [(j, None, lab) for j, lab in data.items()]
    else:
        column = {"key": "key", "doc": id_field, "text": text_field}[by]
        triples = [(_get(r, column, n), _get(r, pair_field, n) if pair_field else None, _get(r, field, n))
                   for n, r in enumerate(read_rows(data))]
    items, texts = [], []
    for n, (join, pair, label) in enumerate(triples):
        texts.append(str(join) if pair is None else f"{join} | {pair}")
        if by == "key":
            keys = [join]
        elif by == "doc":
            keys = store.windows(join)
            if not keys:
                raise KeyNotFoundError(f"row {n}: document id {join!r} is not in {store.location.url} "
                                       f"version {store.version}; build the corpus with that id field first")
        else:
            keys = store.keys_for(join, pair)
        value = _label_id(label, label_to_id, n, texts[n]) if label_to_id is not None else label
        items += [Example(k, {"labels": value}, n, w) for w, k in enumerate(keys)]
    examples = Examples(items, texts)
    check_stored(store, examples)
    return examples


def sequence_labels(store: Store, data: Mapping[str, Any] | Rows, **options: Any) -> dict[str, dict[str, Any]]:
    """`sequence_examples(...).to_mapping()`: {key: {"labels": label}}; identical windows must agree."""
    return sequence_examples(store, data, **options).to_mapping()


# -- token labels ---------------------------------------------------------------------------------
def token_examples(store: Store, data: Rows, *, words_field: str = "tokens", labels_field: str = "ner_tags",
                   text_field: str | None = None, label_to_id: Mapping[Any, int] | None = None) -> Examples:
    """Word-level tags -> one example {"labels": int64 [n_tokens]} per window of each row.

    Each row has `words_field` (list of words) and `labels_field` (one label per word). Without
    `text_field` the words are tokenized pre-split (`is_split_into_words`, as a build with
    `--words-field` stores them; for WordPiece tokenizers the same windows as the words joined
    by spaces). With `text_field`, `row[text_field]` is tokenized and each word must appear in
    it, in order.
    """
    windower = windower_for(store)
    rows = read_rows(data)
    items, texts, parsed = [], [], []
    for n, row in enumerate(rows):
        words = [str(w) for w in _get(row, words_field, n)]
        tags = list(_get(row, labels_field, n))
        text = str(_get(row, text_field, n)) if text_field else " ".join(words)
        texts.append(text)
        if len(words) != len(tags):
            raise InvalidInputError(f"row {n}: {len(words)} words but {len(tags)} labels ({_show(text)})")
        ids = [_label_id(t, label_to_id, n, text) if label_to_id is not None else _int_label(t, n, text)
               for t in tags]
        parsed.append((words, ids, text))
    if text_field:
        windows = windower.detailed_windows([t for _, _, t in parsed])
    else:
        windows = windower.detailed_windows([w for w, _, _ in parsed], split_words=True)
    for n, ((words, ids, text), row_windows) in enumerate(zip(parsed, windows)):
        firsts = (_text_firsts(text, words, row_windows, n) if text_field
                  else first_subtokens(windower, words, row_windows))
        for w, (window, first) in enumerate(zip(row_windows, firsts)):
            labels = np.full(len(window.ids), IGNORE, dtype=np.int64)
            present = first >= 0
            labels[first[present]] = np.asarray(ids, dtype=np.int64)[present]
            items.append(Example(_key(window), {"labels": labels}, n, w, tuple(int(p) for p in first)))
    examples = Examples(items, texts)
    check_stored(store, examples, hint="" if text_field else
                  "; if the store was built from a text field that is not the words joined by spaces, "
                  "pass text_field=")
    return examples


def token_labels(store: Store, data: Rows, **options: Any) -> dict[str, dict[str, Any]]:
    """`token_examples(...).to_mapping()`: {key: {"labels": ...}}; identical windows must agree."""
    return token_examples(store, data, **options).to_mapping()


def first_subtokens(windower: Windower, words: list[str], windows: list[Window]) -> list[np.ndarray]:
    """Per window, per word: the position of the word's first sub-token (-1: not in this window).

    The first sub-token is found in an untruncated encoding (its offset inside the word), so a
    window that starts in the middle of a word does not mistake a later sub-token for the first.
    """
    whole = windower.tokenizer(words, is_split_into_words=True, add_special_tokens=False,
                               return_offsets_mapping=True)
    first: dict[int, tuple[int, int]] = {}
    for w, off in zip(whole.word_ids(), whole["offset_mapping"]):
        if w is not None and w not in first:
            first[w] = tuple(off)
    out = []
    for window in windows:
        pos = np.full(len(words), -1, dtype=np.int64)
        previous = None
        for t, (w, off) in enumerate(zip(window.word_ids or [], window.offsets)):
            if w is not None and w != previous and first.get(w) == tuple(off):
                pos[w] = t
            previous = w
        out.append(pos)
    return out


def _text_firsts(text: str, words: list[str], windows: list[Window], n: int) -> list[np.ndarray]:
    spans, start = [], 0
    for word in words:
        at = text.find(word, start)
        if at < 0:
            raise InvalidInputError(f"row {n}: word {word!r} is not in the text after character {start} "
                                    f"({_show(text)}); the words must appear in the text, in order")
        spans.append(at)
        start = at + len(word)
    starts = {a: i for i, a in enumerate(spans)}
    out = []
    for window in windows:
        pos = np.full(len(words), -1, dtype=np.int64)
        for t, ((a, b), seg) in enumerate(zip(window.offsets, window.sequence_ids)):
            if seg == 0 and b > a and a in starts and pos[starts[a]] < 0:  # the word's first sub-token
                pos[starts[a]] = t
        out.append(pos)
    return out


# -- QA labels ------------------------------------------------------------------------------------
def qa_examples(store: Store, data: Rows, *, question_field: str = "question", context_field: str = "context",
                answers_field: str = "answers") -> Examples:
    """SQuAD answers -> one example {"start_positions": s, "end_positions": e} per window of each row.

    Rows hold a question, a context and `answers` as {"text": [...], "answer_start": [...]}
    (the first answer is the training target). The store must have been built from
    (question, context) pairs. A row whose answer fits in none of its windows raises.
    """
    windower = windower_for(store)
    rows = read_rows(data)
    parsed, texts = [], []
    for n, row in enumerate(rows):
        question, context = str(_get(row, question_field, n)), str(_get(row, context_field, n))
        texts.append(f"{question} | {context}")
        answers = _get(row, answers_field, n)
        try:
            answer, start_char = str(answers["text"][0]), int(answers["answer_start"][0])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise InvalidInputError(f"row {n}: {answers_field!r} must be {{'text': [...], 'answer_start': "
                                    f"[...]}} with one answer or more, got {answers!r}") from e
        if context[start_char: start_char + len(answer)] != answer:
            raise InvalidInputError(f"row {n}: the answer {answer!r} is not at answer_start {start_char} of "
                                    f"the context ({_show(context)})")
        parsed.append((question, context, start_char, start_char + len(answer)))
    windows = windower.detailed_windows([p[0] for p in parsed], [p[1] for p in parsed]) if parsed else []
    items = []
    for n, ((_question, context, a, b), row_windows) in enumerate(zip(parsed, windows)):
        labels = [_answer_positions(w, a, b) for w in row_windows]
        if all(lab["start_positions"] == 0 for lab in labels):
            raise InvalidInputError(
                f"row {n}: the answer {context[a:b]!r} fits in none of the row's windows (longer than "
                f"a window's context; {_show(texts[n])}); drop the row or build with a larger --max-length")
        items += [Example(_key(w), lab, n, i) for i, (w, lab) in enumerate(zip(row_windows, labels))]
    examples = Examples(items, texts)
    check_stored(store, examples)
    return examples


def qa_labels(store: Store, data: Rows, **options: Any) -> dict[str, dict[str, Any]]:
    """`qa_examples(...).to_mapping()`: {key: positions}; identical windows must agree."""
    return qa_examples(store, data, **options).to_mapping()


def _answer_positions(w: Window, start_char: int, end_char: int) -> dict[str, int]:
    ctx = [i for i, s in enumerate(w.sequence_ids) if s == 1]
    if not ctx or w.offsets[ctx[0]][0] > start_char or w.offsets[ctx[-1]][1] < end_char:
        return {"start_positions": 0, "end_positions": 0}
    start = next(i for i in ctx if w.offsets[i][1] > start_char)
    end = next(i for i in reversed(ctx) if w.offsets[i][0] < end_char)
    return {"start_positions": start, "end_positions": end}


# -- shared ---------------------------------------------------------------------------------------
def windower_for(store: Store) -> Windower:
    """The store's `Windower` (its recipe's tokenizer, fingerprint-checked), loaded once per store."""
    if store._tokenizer is None:  # share the store's tokenizer (fingerprint-checked)
        store._tokenizer = Windower.from_recipe(store.recipe)
    return store._tokenizer


def _key(w: Window) -> str:
    from erstore.keys import window_key

    return window_key(w.ids, w.boundary)


def _show(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _label_id(tag: Any, label_to_id: Mapping[Any, int], n: int, text: str) -> int:
    try:
        return label_to_id[tag]
    except (KeyError, TypeError) as e:
        raise InvalidInputError(f"row {n}: label {tag!r} is not in label_to_id ({_show(text)}); add it "
                                "to the mapping") from e


def _int_label(tag: Any, n: int, text: str) -> int:
    if isinstance(tag, (bool, str)) or not isinstance(tag, (int, np.integer)):
        raise InvalidInputError(f"row {n}: label {tag!r} is not an integer id ({_show(text)}); "
                                "pass label_to_id={...}")
    return int(tag)


def _get(row: Mapping[str, Any], name: str, n: int) -> Any:
    try:
        return row[name]
    except (KeyError, TypeError) as e:
        fields = ", ".join(sorted(row)) if isinstance(row, Mapping) else type(row).__name__
        raise InvalidInputError(f"row {n} has no field {name!r} (fields: {fields}); name the right one "
                                "with the *_field argument") from e


def check_stored(store: Store, examples: Examples, hint: str = "") -> None:
    """KeyNotFoundError naming the row (and its text) of the first example whose window is not stored."""
    keys = examples.keys
    found = store.index.find(keys) if keys else []
    missing = [e for e, p in zip(examples, found) if p < 0]
    if missing:
        e = missing[0]
        raise KeyNotFoundError(
            f"{len(missing)} labelled window(s) are not in {store.location.url} version "
            f"{store.version}, e.g. window {e.window} of row {e.row} ({_show(examples.texts[e.row])}); "
            "build the store from the same texts (and pair/words field) first, or drop those rows" + hint
        )
