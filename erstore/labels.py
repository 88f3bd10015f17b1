"""Joining labels to stored sequences: by key, by corpus document id, or by text.

Every function returns `{key: fields}` for `StoreDataset(labels=...)` / `store.dataset(labels=...)`:

- `sequence_labels`: one label per document (classification/regression); every window of the
  document gets it. Join by key, by document id (`store.windows(id)`) or by text (`store.keys_for`).
- `token_labels`: word-level tags (NER). The text is tokenised exactly as the build did (same
  windows, via `Windower.detailed_windows`); the first sub-token of each word gets the word's
  label, other sub-tokens and special tokens get -100 (transformers' token-classification
  recipe). A window that starts inside a word labels none of that word's sub-tokens.
- `qa_labels`: SQuAD-style answers (character spans in the context of a question/context pair)
  become `start_positions`/`end_positions`; windows without the whole answer point at 0 (the
  [CLS] token), as in transformers' QA examples.

Inputs are Python objects (a mapping, or an iterable of dict rows) or a JSONL file path. A key
that two rows label differently raises (identical windows are stored once). Not here: label
vocabularies beyond an explicit `label_to_id` mapping, and character-span entity formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from erstore.errors import InvalidInputError, KeyNotFoundError
from erstore.store import Store
from erstore.tokenize import Window, Windower

IGNORE = -100


def read_rows(data: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows from a JSONL file path, or the given iterable of dicts."""
    if not isinstance(data, (str, os.PathLike)):
        return list(data)
    path = Path(data)
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise InvalidInputError(f"{path}:{lineno}: malformed JSON ({e}); fix the line") from e
    return rows


def sequence_labels(store: Store, data: Mapping[str, Any] | str | os.PathLike[str] | Iterable[Mapping[str, Any]], *,
                    by: str = "key", field: str = "label", id_field: str = "id", text_field: str = "text",
                    pair_field: str | None = None, label_to_id: Mapping[Any, int] | None = None) -> dict[str, dict[str, Any]]:
    """Document labels -> {key: {"labels": label}} for every stored window of each document.

    `data` is a mapping (key, document id or text -> label) or rows/JSONL with `field` and the
    join column (`id_field` for by="doc", `text_field` [+ `pair_field`] for by="text", "key").
    """
    if by not in ("key", "doc", "text"):
        raise InvalidInputError(f"by must be 'key', 'doc' or 'text', got {by!r}")
    if isinstance(data, Mapping):
        pairs = [(j, None, lab) for j, lab in data.items()]
    else:
        column = {"key": "key", "doc": id_field, "text": text_field}[by]
        pairs = [(_get(r, column), r.get(pair_field) if pair_field else None, _get(r, field)) for r in read_rows(data)]
    out: dict[str, dict[str, Any]] = {}
    for join, pair, label in pairs:
        if by == "key":
            keys = [join]
        elif by == "doc":
            keys = store.windows(join)
        else:
            keys = store.keys_for(join, pair)
        value = label_to_id[label] if label_to_id is not None else label
        for key in keys:
            _add(out, key, {"labels": value})
    _check_stored(store, out)
    return out


def token_labels(store: Store, data: str | os.PathLike[str] | Iterable[Mapping[str, Any]], *,
                 words_field: str = "tokens", labels_field: str = "ner_tags", text_field: str | None = None,
                 label_to_id: Mapping[Any, int] | None = None) -> dict[str, dict[str, Any]]:
    """Word-level tags -> {key: {"labels": int64 array [n_tokens]}} aligned to sub-tokens.

    Each row has `words_field` (list of words) and `labels_field` (one label per word). The text
    is `row[text_field]` if given (each word must appear in it, in order), else the words joined
    by single spaces, which must be how the corpus text was made.
    """
    windower = _windower(store)
    out: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(read_rows(data)):
        words, tags = list(_get(row, words_field)), list(_get(row, labels_field))
        if len(words) != len(tags):
            raise InvalidInputError(f"row {n}: {len(words)} words but {len(tags)} labels")
        text = str(_get(row, text_field)) if text_field else " ".join(words)
        spans = _word_spans(text, words, n)
        starts = {start: i for i, (start, _) in enumerate(spans)}
        ids = [label_to_id[t] if label_to_id is not None else _int_label(t, n) for t in tags]
        for w in windower.detailed_windows([text])[0]:
            labels = np.full(len(w.ids), IGNORE, dtype=np.int64)
            for t, ((a, b), seg) in enumerate(zip(w.offsets, w.sequence_ids)):
                if seg == 0 and b > a and a in starts:  # the word's first sub-token
                    labels[t] = ids[starts[a]]
            _add(out, _key(w), {"labels": labels})
    _check_stored(store, out)
    return out


def qa_labels(store: Store, data: str | os.PathLike[str] | Iterable[Mapping[str, Any]], *,
              question_field: str = "question", context_field: str = "context",
              answers_field: str = "answers") -> dict[str, dict[str, Any]]:
    """SQuAD answers -> {key: {"start_positions": s, "end_positions": e}} for each window.

    Rows hold a question, a context and `answers` as {"text": [...], "answer_start": [...]}
    (the first answer is used). The store must have been built from (question, context) pairs.
    """
    windower = _windower(store)
    out: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(read_rows(data)):
        question, context = str(_get(row, question_field)), str(_get(row, context_field))
        answers = _get(row, answers_field)
        start_char = int(answers["answer_start"][0])
        end_char = start_char + len(answers["text"][0])
        if context[start_char:end_char] != answers["text"][0]:
            raise InvalidInputError(f"row {n}: the answer text is not at answer_start in the context")
        for w in windower.detailed_windows([question], [context])[0]:
            _add(out, _key(w), _answer_positions(w, start_char, end_char))
    _check_stored(store, out)
    return out


def _answer_positions(w: Window, start_char: int, end_char: int) -> dict[str, int]:
    ctx = [i for i, s in enumerate(w.sequence_ids) if s == 1]
    if not ctx or w.offsets[ctx[0]][0] > start_char or w.offsets[ctx[-1]][1] < end_char:
        return {"start_positions": 0, "end_positions": 0}
    start = next(i for i in ctx if w.offsets[i][1] > start_char)
    end = next(i for i in reversed(ctx) if w.offsets[i][0] < end_char)
    return {"start_positions": start, "end_positions": end}


def _windower(store: Store) -> Windower:
    if store._tokenizer is None:  # share the store's tokenizer (fingerprint-checked)
        store._tokenizer = Windower.from_recipe(store.recipe)
    return store._tokenizer


def _key(w: Window) -> str:
    from erstore.keys import window_key

    return window_key(w.ids, w.boundary)


def _word_spans(text: str, words: list[str], n: int) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for word in words:
        start = text.find(word, pos)
        if start < 0:
            raise InvalidInputError(f"row {n}: word {word!r} not found in the text after position {pos}")
        spans.append((start, start + len(word)))
        pos = start + len(word)
    return spans


def _int_label(tag: Any, n: int) -> int:
    if isinstance(tag, (bool, str)) or not isinstance(tag, (int, np.integer)):
        raise InvalidInputError(f"row {n}: label {tag!r} is not an integer id; pass label_to_id={{...}}")
    return int(tag)


def _get(row: Mapping[str, Any], name: str) -> Any:
    try:
        return row[name]
    except KeyError as e:
        raise InvalidInputError(f"a row has no field {name!r} (fields: {', '.join(sorted(row))}); "
                                "name the right one with the *_field argument") from e


def _add(out: dict[str, dict[str, Any]], key: str, fields: dict[str, Any]) -> None:
    old = out.get(key)
    if old is not None and not all(np.array_equal(old[k], v) for k, v in fields.items()):
        raise InvalidInputError(
            f"window {key} gets two different labels ({old} vs {fields}): identical windows are "
            "stored once, so their labels must agree; deduplicate or fix the label rows"
        )
    out.setdefault(key, fields)


def _check_stored(store: Store, labels: dict[str, dict[str, Any]]) -> None:
    keys = list(labels)
    missing = [k for k, p in zip(keys, store.index.find(keys)) if p < 0]
    if missing:
        raise KeyNotFoundError(
            f"{len(missing)} labelled window(s) are not in {store.location.url} version "
            f"{store.version}, e.g. {missing[0]}; build the store from the same texts (and "
            "pair field) first, or drop those rows"
        )
