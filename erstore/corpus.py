"""Reading a corpus: JSONL or plain text files, and the built-in default corpus.

A corpus is a list of `Document`s (id, text, optional pair). JSONL fields are configurable; a
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
    words: tuple[str, ...] | None = None  # pre-tokenized input; `text` is then the words joined by spaces


def read_corpus(path: str | os.PathLike[str], *, text_field: str = "text", pair_field: str | None = None,
                id_field: str | None = None, words_field: str | None = None,
                limit: int | None = None) -> list[Document]:
    """Load a corpus file (``.jsonl``/``.json`` lines, else plain text) or the default corpus.

    `words_field` (JSONL): each row holds a list of words, tokenized pre-split; `text_field` is
    then not read."""
    if os.fspath(path) == DEFAULT_CORPUS:
        return default_corpus(limit or DEFAULT_CORPUS_SIZE)
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"corpus file {p} does not exist; pass --corpus a .jsonl or .txt file")
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        docs = _read_jsonl(p, text_field, pair_field, id_field, words_field)
    elif words_field:
        raise InvalidInputError(f"--words-field needs a JSONL corpus (a list of words per row); {p} is not .jsonl")
    else:
        with p.open(encoding="utf-8") as f:
            docs = [Document(str(i), line.rstrip("\n")) for i, line in enumerate(f) if line.strip()]
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise InvalidInputError(f"corpus {p} holds no documents; add text or pick another file")
    return docs


def _read_jsonl(p: Path, text_field: str, pair_field: str | None, id_field: str | None,
                words_field: str | None = None) -> list[Document]:
    docs = []
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
            words = _words(row, words_field, p, lineno) if words_field else None
            text = " ".join(words) if words else _field(row, text_field, p, lineno, "--text-field")
            pair = _field(row, pair_field, p, lineno, "--pair-field") if pair_field else None
            doc_id = str(_field(row, id_field, p, lineno, "--id-field")) if id_field else str(lineno - 1)
            if doc_id in seen_ids:
                raise InvalidInputError(f"{p}:{lineno}: duplicate document id {doc_id!r} in field {id_field!r}")
            seen_ids.add(doc_id)
            docs.append(Document(doc_id, text, pair, words))
    return docs


def _words(row: dict, name: str, p: Path, lineno: int) -> tuple[str, ...]:
    if name not in row:
        raise InvalidInputError(f"{p}:{lineno}: no field {name!r} (fields: {', '.join(sorted(row)) or 'none'}); "
                                "name the right one with --words-field")
    value = row[name]
    if not isinstance(value, list) or not value or not all(isinstance(w, str) for w in value):
        raise InvalidInputError(f"{p}:{lineno}: field {name!r} must be a non-empty list of words (strings), "
                                f"got {str(value)[:80]!r}")
    return tuple(value)


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
