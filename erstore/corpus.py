"""Reading a corpus as a stream of `Document`s: files of many formats, in-memory objects, the default corpus.

`iter_corpus(source, ...)` streams documents (never the whole corpus in memory) from
- a path: a JSONL, plain-text, CSV/TSV, Parquet or Arrow file (optionally .gz/.zst/.bz2), a folder
  of such files, a `datasets` save_to_disk folder, or a glob pattern (see `erstore.corpus_files`);
- a `datasets.Dataset` / `IterableDataset`, a pyarrow Table, or any iterable of strings, dicts or
  `Document`s (`erstore.build(corpus=[...])`);
- the name of the built-in default corpus.
Field options (`text_field`, `pair_field`, `id_field`, `words_field`) mean the same for every
format: a JSON key, a column, a dict key. Errors name the file and line (or row) and the fix.

Document ids are global: the line (or row) number within the file, prefixed by the file's path
inside a folder or glob, or the `id_field` value; so they do not depend on `shard=(rank, world)`,
which yields only that rank's share and, where the format allows (byte ranges of an uncompressed
text/JSONL file, Parquet row groups, Arrow record batches, whole files of a many-file corpus,
contiguous rows of a Dataset), reads nothing of the others' data. Files that cannot be entered
in the middle (compressed, CSV) and one-shot iterables are read by every rank, each keeping every
world-th document.

Duplicate ids (only possible with `id_field`) are found with 8 bytes per document (xxh3-64 of
each id, kept in sorted numpy runs), not a set of strings: ~32 MB for the ~4M documents of a
1B-token corpus. Duplicates across ranks are not seen by one rank.

The default corpus is real English prose available offline without shipping a data file: the
paragraphs of the Python standard library's docstrings, read with `ast` (nothing is imported or
executed), in sorted file order, so the same Python version always yields the same corpus.
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from erstore import corpus_files
from erstore.corpus_files import BLOCK_ROWS, Block
from erstore.errors import InvalidInputError

DEFAULT_CORPUS = "stdlib-docstrings"
DEFAULT_CORPUS_SIZE = 4000
FLAGS = {"text": "--text-field", "pair": "--pair-field", "id": "--id-field", "words": "--words-field"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    pair: str | None = None
    words: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Fields:
    """Which field (JSON key, column, dict key) holds what. Without a text field in a record,
    `words` joined by single spaces are the text (how `erstore.labels.word_labels` joins them)."""

    text: str = "text"
    pair: str | None = None
    id: str | None = None
    words: str | None = None

    def columns(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.text, self.pair, self.id, self.words) if c))

    def optional(self) -> frozenset[str]:
        return frozenset([self.text]) if self.words else frozenset()


def iter_corpus(source: Any, *, format: str | None = None, text_field: str = "text",
                pair_field: str | None = None, id_field: str | None = None, words_field: str | None = None,
                limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> Iterator[Document]:
    """Stream the documents of `source` (see the module docstring for what it may be).

    `limit` keeps the first N documents of the whole corpus (then sharded); `shard=(rank, world)`
    yields only rank's share. Raises InvalidInputError (naming file:line and the fix) on bad input.
    """
    rank, world = _check_shard(shard)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"--limit must be a positive number of documents, got {limit!r}")
    fields = Fields(text_field, pair_field, id_field, words_field)
    # With a limit, "the first N documents" is a global notion: every rank reads them and keeps its stripe.
    stripe_after = world > 1 and limit is not None
    blocks = _blocks(source, format, fields, (0, 1) if stripe_after else (rank, world), limit)
    seen = _SeenIds() if id_field else None
    count = 0
    for block in blocks:
        docs = _documents(block, fields)
        if limit is not None:
            docs = docs[: limit - count]
        if seen is not None:
            bad = seen.add([d.id for d in docs])
            if bad >= 0:
                raise InvalidInputError(f"{block.location(bad)}: duplicate document id {docs[bad].id!r} in "
                                        f"field {id_field!r}; ids must be unique (or leave out --id-field)")
        for doc in docs:
            count += 1
            if not stripe_after or (count - 1) % world == rank:
                yield doc
        if limit is not None and count >= limit:
            return
    if count == 0 and world == 1:
        raise InvalidInputError(f"corpus {corpus_label(source)} holds no documents; add text or pick another "
                                "file")


def read_corpus(source: Any, **options: Any) -> list[Document]:
    """`list(iter_corpus(source, **options))`: the whole corpus in memory (small corpora, tests)."""
    return list(iter_corpus(source, **options))


def check_corpus(source: Any, *, format: str | None = None, text_field: str = "text",
                 pair_field: str | None = None, id_field: str | None = None,
                 words_field: str | None = None, **_: Any) -> None:
    """Cheap preflight before a model is loaded: the source exists, its files have known formats
    (and the libraries to read them), and the first record has the fields asked for.

    A one-shot iterator (a generator) cannot be peeked without consuming it: only its type is checked.
    """
    if _is_path(source) and os.fspath(source) == DEFAULT_CORPUS:
        return
    if not _is_path(source) and iter(source) is source:
        return
    for _ in iter_corpus(source, format=format, text_field=text_field, pair_field=pair_field,
                         id_field=id_field, words_field=words_field, limit=1):
        return


def corpus_label(source: Any) -> str:
    """A short description of a corpus source for manifests and messages (never its contents)."""
    if _is_path(source):
        return os.fspath(source)
    kind = f"{type(source).__module__.split('.')[0]}.{type(source).__name__}"
    try:
        return f"{kind} of {len(source)} rows"
    except TypeError:
        return kind


def _check_shard(shard: Any) -> tuple[int, int]:
    try:
        rank, world = (int(x) for x in shard)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"shard must be (rank, world_size), got {shard!r}") from e
    if not 0 <= rank < world:
        raise InvalidInputError(f"shard rank must be in [0, world_size), got rank {rank} of {world}")
    return rank, world


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


# -- sources -> blocks ----------------------------------------------------------------------------
def _blocks(source: Any, format: str | None, fields: Fields, shard: tuple[int, int],
            limit: int | None) -> Iterator[Block]:
    rank, world = shard
    if _is_path(source):
        if os.fspath(source) == DEFAULT_CORPUS:
            docs = default_corpus(limit or DEFAULT_CORPUS_SIZE)
            yield from _striped(docs, "default corpus", rank, world)
            return
        yield from _file_blocks(corpus_files.discover(source, format), fields, rank, world)
        return
    if format is not None:
        raise InvalidInputError(f"format={format!r} applies to corpus files; {corpus_label(source)} is read as is")
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise InvalidInputError(f"the corpus is a {type(source).__name__} with splits {', '.join(source)}; "
                                f"pass one split, e.g. corpus=dataset[{next(iter(source), 'train')!r}]")
    if datasets is not None and isinstance(source, datasets.Dataset):
        yield from _table_blocks(source, fields, rank, world, dataset=True)
    elif datasets is not None and isinstance(source, datasets.IterableDataset):
        yield from _iterable_dataset_blocks(source, fields, rank, world)
    elif type(source).__module__.startswith("pyarrow") and hasattr(source, "to_batches"):
        yield from _table_blocks(source, fields, rank, world, dataset=False)
    elif isinstance(source, (bytes, bytearray, Mapping)) or not isinstance(source, Iterable):
        raise InvalidInputError(
            f"cannot read a corpus from {type(source).__name__}: pass a path, a datasets.Dataset or "
            "IterableDataset, or an iterable of strings or dicts"
        )
    else:
        yield from _striped(source, "corpus", rank, world)


def _striped(items: Iterable[Any], where: str, rank: int, world: int) -> Iterator[Block]:
    """Blocks of row-wise records; with world > 1 only rows with row % world == rank."""
    it = iter(items) if world == 1 else itertools.islice(items, rank, None, world)
    first = 0
    while True:
        chunk = list(itertools.islice(it, BLOCK_ROWS))
        if not chunk:
            return
        if world == 1:
            rows: Any = range(first, first + len(chunk))
        else:
            rows = range(rank + first * world, rank + (first + len(chunk)) * world, world)
        yield Block(rows, where, records=chunk)
        first += len(chunk)


def _file_blocks(files: list[corpus_files.CorpusFile], fields: Fields, rank: int, world: int) -> Iterator[Block]:
    cols, optional = fields.columns(), fields.optional()
    if world == 1:
        for f in files:
            yield from corpus_files.read(f, cols, optional=optional)
        return
    # Whole unsplittable files are units of their own when there are enough files to go round;
    # otherwise every rank reads them and keeps its stripe of rows.
    stripe_whole = len(files) < world
    units = []
    for i, f in enumerate(files):
        if f.splittable:
            units += [(i, part, w) for part, w in corpus_files.units(f, world)]
        elif not stripe_whole:
            units.append((i, None, float(f.path.stat().st_size)))
    mine: dict[int, list[Any]] = {}
    for i, part in _assign(units, world, rank):
        mine.setdefault(i, []).append(part)
    for i, f in enumerate(files):
        if not f.splittable and stripe_whole:
            yield from corpus_files.read(f, cols, optional=optional, stripe=(rank, world))
        elif i in mine:
            parts = None if mine[i] == [None] else mine[i]
            yield from corpus_files.read(f, cols, optional=optional, parts=parts)


def _assign(units: list[tuple[int, Any, float]], world: int, rank: int) -> list[tuple[int, Any]]:
    """This rank's units: contiguous runs balanced by weight (a unit goes where its midpoint falls)."""
    total = sum(w for _, _, w in units)
    out, acc = [], 0.0
    for i, part, w in units:
        mid = (acc + w / 2) / total if total else 0.0
        acc += w
        if min(world - 1, int(mid * world)) == rank:
            out.append((i, part))
    return out


def _table_blocks(source: Any, fields: Fields, rank: int, world: int, *, dataset: bool) -> Iterator[Block]:
    """A datasets.Dataset or pyarrow Table: this rank's contiguous rows, in Arrow batches."""
    names = list(source.column_names)
    present = _present(names, fields)
    n = len(source) if dataset else source.num_rows
    start, stop = n * rank // world, n * (rank + 1) // world
    if dataset:
        part = source.select(range(start, stop)) if world > 1 else source
        tables = part.with_format("arrow", columns=present).iter(batch_size=BLOCK_ROWS)
    else:
        tables = source.slice(start, stop - start).select(present).to_batches(max_chunksize=BLOCK_ROWS)
    first = start
    for table in tables:
        cols = {c: table.column(c).to_pylist() for c in present}
        yield Block(range(first, first + table.num_rows), "corpus", columns=cols)
        first += table.num_rows


def _iterable_dataset_blocks(source: Any, fields: Fields, rank: int, world: int) -> Iterator[Block]:
    """A datasets.IterableDataset: every rank streams it and keeps its stripe of rows."""
    first = 0
    present: list[str] | None = None
    for batch in source.iter(batch_size=BLOCK_ROWS):
        if present is None:
            present = _present(list(batch), fields)
        n = len(batch[present[0]]) if present else 0
        keep = [i for i in range(n) if (first + i) % world == rank]
        cols = {c: [batch[c][i] for i in keep] if world > 1 else batch[c] for c in present}
        if keep:
            yield Block([first + i for i in keep], "corpus", columns=cols)
        first += n


def _present(names: list[str], fields: Fields) -> list[str]:
    for name, kind in ((fields.text, "text"), (fields.pair, "pair"), (fields.id, "id"), (fields.words, "words")):
        if name and name not in names and name not in fields.optional():
            raise InvalidInputError(f"the corpus has no column {name!r} (columns: {', '.join(names) or 'none'}); "
                                    f"name the right one with {FLAGS[kind]} ({kind}_field=)")
    return [c for c in fields.columns() if c in names]


# -- blocks -> documents --------------------------------------------------------------------------
def _documents(block: Block, fields: Fields) -> list[Document]:
    """One `Document` per row of `block`, every field checked (the error names its row)."""
    out = []
    if block.columns is not None:
        cols = block.columns
        texts, pairs = cols.get(fields.text), cols.get(fields.pair) if fields.pair else None
        ids, words = cols.get(fields.id) if fields.id else None, cols.get(fields.words) if fields.words else None
        for i, row in enumerate(block.rows):
            w = _words(words[i], fields.words, block, i) if words is not None else None
            text = _text(texts[i], fields.text, block, i) if texts is not None else " ".join(w or ())
            pair = _text(pairs[i], fields.pair, block, i) if pairs is not None else None
            doc_id = _id(ids[i], fields.id, block, i) if ids is not None else f"{block.prefix}{block.offset + row}"
            out.append(Document(doc_id, text, pair, w))
        return out
    for i, (row, rec) in enumerate(zip(block.rows, block.records or ())):
        if isinstance(rec, Mapping):
            out.append(_from_mapping(rec, fields, block, i, row))
        elif isinstance(rec, str) and not block.strict:
            for name, kind in ((fields.pair, "pair"), (fields.id, "id"), (fields.words, "words")):
                if name:
                    raise InvalidInputError(f"{block.location(i)}: a plain text has no {kind} field {name!r}; "
                                            "use JSONL, CSV or Parquet (or dicts) for fields")
            out.append(Document(f"{block.prefix}{block.offset + row}", _text(rec, "text", block, i)))
        elif isinstance(rec, Document) and not block.strict:
            out.append(rec)
        else:
            expected = ("a JSON object (JSON Lines: one object per line)" if block.strict
                        else "a string, a dict or a Document")
            raise InvalidInputError(f"{block.location(i)}: expected {expected}, got {type(rec).__name__}")
    return out


def _from_mapping(rec: Mapping[str, Any], fields: Fields, block: Block, i: int, row: int) -> Document:
    def get(name: str, kind: str) -> Any:
        if name not in rec:
            raise InvalidInputError(
                f"{block.location(i)}: no field {name!r} (fields: {', '.join(sorted(map(str, rec))) or 'none'}); "
                f"name the right one with {FLAGS[kind]}"
            )
        return rec[name]

    w = _words(get(fields.words, "words"), fields.words, block, i) if fields.words else None
    if w is not None and fields.text not in rec:
        text = " ".join(w)
    else:
        text = _text(get(fields.text, "text"), fields.text, block, i)
    pair = _text(get(fields.pair, "pair"), fields.pair, block, i) if fields.pair else None
    doc_id = _id(get(fields.id, "id"), fields.id, block, i) if fields.id else f"{block.prefix}{block.offset + row}"
    return Document(doc_id, text, pair, w)


def _text(value: Any, name: str | None, block: Block, i: int) -> str:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InvalidInputError(f"{block.location(i)}: field {name!r} must be a non-empty string, got "
                            f"{_short(value)}; fill or drop the row")


def _id(value: Any, name: str | None, block: Block, i: int) -> str:
    if (isinstance(value, str) and value) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise InvalidInputError(f"{block.location(i)}: id field {name!r} must be a non-empty string or an "
                            f"integer, got {_short(value)}")


def _words(value: Any, name: str | None, block: Block, i: int) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and value and all(isinstance(w, str) and w for w in value):
        return tuple(value)
    raise InvalidInputError(f"{block.location(i)}: words field {name!r} must be a non-empty list of "
                            f"non-empty strings, got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _SeenIds:
    """Exact-enough duplicate detection in 8 bytes per id: xxh3-64 hashes in sorted runs whose
    sizes double (an LSM), so adding n ids costs O(n log n) and memory never holds the strings.
    A 64-bit collision (odds ~n^2 / 2^65: 1 in 2 million at 4M documents) reads as a duplicate."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def add(self, ids: list[str]) -> int:
        """Record `ids`; return the index of the first one seen before (or repeated), else -1."""
        if not ids:
            return -1
        h = np.fromiter((xxhash.xxh3_64_intdigest(i.encode()) for i in ids), dtype=np.uint64, count=len(ids))
        order = np.argsort(h, kind="stable")
        hs = h[order]
        bad = [int(order[j + 1]) for j in np.flatnonzero(hs[1:] == hs[:-1])]
        for run in self._runs:
            pos = np.minimum(np.searchsorted(run, h), len(run) - 1)
            bad += np.flatnonzero(run[pos] == h).tolist()
        if bad:
            return min(bad)
        new = hs
        while self._runs and len(self._runs[-1]) <= len(new):
            new = np.sort(np.concatenate([self._runs.pop(), new]))
        self._runs.append(new)
        return -1


_WORD = re.compile(r"[A-Za-z]{2,}")


def _prose(paragraph: str) -> str | None:
    """Normalise a docstring paragraph; None unless it reads like English prose."""
    text = " ".join(paragraph.split())
    if len(text) < 80 or not text[0].isupper() or any(m in text for m in (">>>", "::", "#", "{")):
        return None
    words = _WORD.findall(text)
    if len(words) < 12 or sum(len(w) for w in words) < 0.7 * len(text.replace(" ", "")):
        return None
    return text


def default_corpus(size: int = DEFAULT_CORPUS_SIZE) -> list[Document]:
    """The first `size` prose paragraphs of the standard library's docstrings (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[Document] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/", "lib2to3/tests/")):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            for paragraph in (doc or "").split("\n\n"):
                text = _prose(paragraph)
                if text and text not in seen:
                    seen.add(text)
                    docs.append(Document(f"{rel}:{len(docs)}", text))
                    if len(docs) >= size:
                        return docs
    return docs
