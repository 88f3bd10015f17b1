"""Reading a corpus: JSONL or plain text files, and the built-in default corpus.

A corpus is a stream of `Document`s (id, text, optional pair): `iter_corpus` reads one file, a
directory or a glob of shard files incrementally, and `shard=(rank, world)` yields one rank's
share (whole files when there are enough, else every world-th document; ids stay global). JSONL fields are configurable; a
plain-text file holds one document per line. Errors name the file, the line and the fix, and
are raised before any model compute.

The default corpus is real English prose available offline without shipping a data file: the
paragraphs of the Python standard library's docstrings, read with `ast` (nothing is imported or
executed), in sorted file order, so the same Python version always yields the same corpus.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from erstore.errors import InvalidInputError

DEFAULT_CORPUS = "stdlib-docstrings"
DEFAULT_CORPUS_SIZE = 4000


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    pair: str | None = None
    words: tuple[str, ...] | None = None


def _files(source: str | os.PathLike[str]) -> list[Path]:
    """The files of a corpus source: one file, every file of a directory, or a glob, sorted."""
    text = os.fspath(source)
    p = Path(text)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    elif any(c in text for c in "*?["):
        import glob

        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise InvalidInputError(f"corpus {text} does not exist or holds no files; pass --corpus a .jsonl "
                                "or .txt file, a folder or a glob of them")
    return files


def iter_corpus(source, *, format: str | None = None, text_field: str = "text", pair_field: str | None = None,
                id_field: str | None = None, words_field: str | None = None, limit: int | None = None,
                shard: tuple[int, int] = (0, 1)):
    """Stream the documents of `source` (file, directory, glob, default-corpus name, or an
    iterable of Documents); never the whole corpus in memory.

    With `shard=(rank, world)` only that rank's documents come out: whole files when there are at
    least `world` files (the others are not opened), else every `world`-th document. Ids are the
    same whatever the shard count: `id_field`, else the line number (prefixed by the file when
    there are several files). `limit` counts documents of the whole corpus, before sharding.
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise InvalidInputError(f"shard {shard} is not (rank, world) with 0 <= rank < world")
    if not isinstance(source, (str, os.PathLike)):
        docs = iter(source)
    elif os.fspath(source) == DEFAULT_CORPUS:
        docs = iter(default_corpus(limit or DEFAULT_CORPUS_SIZE))
    else:
        docs = None
    if docs is not None:
        for i, doc in enumerate(docs):
            if limit is not None and i >= limit:
                return
            if i % world == rank:
                yield doc
        return
    files = _files(source)
    by_file = len(files) >= world and limit is None
    count = 0
    for n, f in enumerate(files):
        if by_file and n % world != rank:
            continue
        prefix = f"{f.relative_to(Path(os.fspath(source))) if Path(os.fspath(source)).is_dir() else f.name}:" \
            if len(files) > 1 else ""
        for doc in _iter_file(f, text_field, pair_field, id_field, prefix):
            if limit is not None and count >= limit:
                return
            if by_file or count % world == rank:
                yield doc
            count += 1


def check_corpus(source, *, format: str | None = None, text_field: str = "text", pair_field: str | None = None,
                 id_field: str | None = None, words_field: str | None = None, **_: object) -> None:
    """Cheap preflight before any model is loaded: the source exists and its first record parses."""
    for _doc in iter_corpus(source, format=format, text_field=text_field, pair_field=pair_field,
                            id_field=id_field, limit=1):
        return
    raise InvalidInputError(f"corpus {source} holds no documents; add text or pick another file")


def _iter_file(p: Path, text_field: str, pair_field: str | None, id_field: str | None, prefix: str):
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_jsonl(p, text_field, pair_field, id_field, prefix)
        return
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                yield Document(f"{prefix}{i}", line.rstrip("\n"))


def read_corpus(path: str | os.PathLike[str], *, text_field: str = "text", pair_field: str | None = None,
                id_field: str | None = None, limit: int | None = None) -> list[Document]:
    """Load a corpus file (``.jsonl``/``.json`` lines, else plain text) or the default corpus."""
    if os.fspath(path) == DEFAULT_CORPUS:
        return default_corpus(limit or DEFAULT_CORPUS_SIZE)
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"corpus file {p} does not exist; pass --corpus a .jsonl or .txt file")
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        docs = list(_read_jsonl(p, text_field, pair_field, id_field))
    else:
        with p.open(encoding="utf-8") as f:
            docs = [Document(str(i), line.rstrip("\n")) for i, line in enumerate(f) if line.strip()]
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise InvalidInputError(f"corpus {p} holds no documents; add text or pick another file")
    return docs


def _read_jsonl(p: Path, text_field: str, pair_field: str | None, id_field: str | None,
                prefix: str = ""):
    seen_ids: set[str] = set()
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InvalidInputError(f"{p}:{lineno}: malformed JSON ({e}); fix or remove the line") from e
            if not isinstance(row, dict):
                raise InvalidInputError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            text = _field(row, text_field, p, lineno, "--text-field")
            pair = _field(row, pair_field, p, lineno, "--pair-field") if pair_field else None
            doc_id = str(_field(row, id_field, p, lineno, "--id-field")) if id_field else f"{prefix}{lineno - 1}"
            if id_field:  # line numbers are unique anyway; do not hold a set of them
                if doc_id in seen_ids:
                    raise InvalidInputError(f"{p}:{lineno}: duplicate document id {doc_id!r} in field {id_field!r}")
                seen_ids.add(doc_id)
            yield Document(doc_id, text, pair)


def _field(row: dict, name: str | None, p: Path, lineno: int, flag: str) -> str:
    if name not in row:
        raise InvalidInputError(
            f"{p}:{lineno}: no field {name!r} (fields: {', '.join(sorted(row)) or 'none'}); "
            f"name the right one with {flag}"
        )
    value = row[name]
    if not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise InvalidInputError(f"{p}:{lineno}: field {name!r} must be a non-empty string, got {value!r}")
    return str(value)


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
