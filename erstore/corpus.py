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

Duplicate ids (only possible with `id_field`) are found with 8 bytes per document (a 64-bit
hash of each id, kept in sorted numpy runs), not a set of strings: ~32 MB for the ~4M documents
of a 1B-token corpus. Duplicates across ranks are not seen by one rank.

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
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

from erstore import corpus_files
from erstore.corpus_files import BLOCK_ROWS, Block
from erstore.corpus_rows import FLAGS, Document, Fields, SeenIds, documents
from erstore.errors import ErstoreError, InvalidInputError

DEFAULT_CORPUS = "stdlib-docstrings"
DEFAULT_CORPUS_SIZE = 4000


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
    seen = SeenIds() if id_field else None
    count = 0
    for block in blocks:
        docs = documents(block, fields)
        if limit is not None:
            docs = docs[: limit - count]
        if seen is not None:
            bad = seen.add([d.id for d in docs])
            if bad >= 0:
                raise InvalidInputError(f"{block.location(bad)}: duplicate document id {docs[bad].id!r} in "
                                        f"field {id_field!r}; ids must be unique (or leave out --id-field)")
        if stripe_after:
            yield from (d for j, d in enumerate(docs, count) if j % world == rank)
        else:
            yield from docs
        count += len(docs)
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
    if not _is_path(source) and isinstance(source, Iterator):
        return
    for _ in iter_corpus(source, format=format, text_field=text_field, pair_field=pair_field,
                         id_field=id_field, words_field=words_field, limit=1):
        return


COUNT_FILES = 256  # document_count reads no more file footers than this


def document_count(source: Any, *, format: str | None = None, limit: int | None = None) -> int | None:
    """How many documents `source` yields (at most `limit`) when that is cheap to know, else None.

    Known: sized in-memory sources (lists, `datasets.Dataset`, pyarrow Tables), Parquet and Arrow
    files and `datasets` folders (row counts from their metadata), the default corpus. Unknown
    without a pass over the data: JSONL, text, CSV and compressed files, one-shot iterables. A
    hint for progress reporting: a source that cannot be read gives None here and fails when read.
    """
    count: int | None = None
    try:
        if _is_path(source) and os.fspath(source) == DEFAULT_CORPUS:
            count = DEFAULT_CORPUS_SIZE
        elif _is_path(source):
            files = corpus_files.discover(source, format)
            if len(files) <= COUNT_FILES and all(f.format in ("parquet", "arrow") for f in files):
                count = sum(corpus_files.row_count(f) for f in files)
        elif isinstance(source, Sized) and not isinstance(source, (bytes, bytearray, Mapping)):
            count = len(source)
    except (ErstoreError, OSError, TypeError, ValueError):
        count = None  # reading the corpus reports the problem with its file and fix
    if limit is not None:
        return limit if count is None else min(count, limit)
    return count


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
        cols = {c: table.column(c) for c in present}
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
