"""The document map of one build (document id -> window keys), spilled to a temporary file.

`index/<build>.docs.json` maps every corpus document to its windows, so it grows with the
corpus; holding it as a Python dict cost ~200 bytes per document for the whole build. Here
entries go to an unnamed temporary file as they come (one JSON line each) and are read back
at commit in parts of a bounded number of documents (`parts`), each rendered as the same JSON
object as before: memory stays one part, whatever the corpus.

The builder's thread adds entries while the write-behind thread journals byte ranges of the
file (`read`, for resume): a lock makes the two safe together.

Not here: parsing or checking the map on read (the store does that).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator

PART_DOCUMENTS = 1 << 17  # documents per document-map part (~6 MB of JSON for short documents)


def entry_line(doc_id: str, keys: list[str]) -> bytes:
    """One finished JSON member, `"id": ["key", ...]` and a newline: the id is JSON-escaped (so no
    raw newline occurs) and keys are hex, so lines join into an object without being parsed."""
    members = '"' + '", "'.join(keys) + '"' if keys else ""
    return f"{json.dumps(doc_id)}: [{members}]\n".encode()


def line_keys(line: bytes) -> list[str]:
    """The window keys of one entry line (the id may hold anything; the keys are after its last `: [`)."""
    inner = line.rstrip(b"\n").rsplit(b": [", 1)[1][:-1]
    return [k.strip(b' "').decode() for k in inner.split(b",")] if inner else []


def render(lines: list[bytes] | bytes) -> bytes:
    """The JSON object of entry lines (a list, or newline-terminated lines in one block)."""
    block = b"".join(lines) if isinstance(lines, list) else lines
    return b"{" + block.rstrip(b"\n").replace(b"\n", b", ") + b"}"


class DocMap:
    """Append-only (doc id, keys) entries on disk; `parts()` renders the docs.json objects."""

    def __init__(self) -> None:
        # Unnamed and removed by the OS when closed (close() or garbage collection).
        self._file = tempfile.TemporaryFile(mode="w+b", prefix="erstore-docs-")  # noqa: SIM115
        self._count = 0
        self.nbytes = 0  # bytes of entry lines so far (offsets for `read`)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def add(self, doc_id: str, keys: list[str]) -> None:
        self.add_lines(entry_line(doc_id, keys), 1)

    def add_lines(self, block: bytes, count: int) -> None:
        """Append `count` entry lines given as one block (one write per tokenizer slice)."""
        with self._lock:
            self._file.write(block)
            self._count += count
            self.nbytes += len(block)

    def read(self, start: int, stop: int) -> bytes:
        """Entry lines in bytes [start, stop) of the map (safe while another thread adds)."""
        with self._lock:
            self._file.flush()
            return os.pread(self._file.fileno(), stop - start, start)

    def lines(self) -> Iterator[bytes]:
        """Every entry line, in the order added."""
        with self._lock:
            self._file.flush()
        offset = 0
        while offset < self.nbytes:
            block = os.pread(self._file.fileno(), min(1 << 22, self.nbytes - offset), offset)
            offset += len(block)
            yield from block.splitlines(keepends=True)

    def parts(self, per_part: int = PART_DOCUMENTS) -> Iterator[bytes]:
        """The map as JSON objects of at most `per_part` documents each, in the order added
        (always at least one, possibly `{}`). A repeated id in one part appears twice and JSON
        readers keep the last, as the dict this replaced did (corpus readers refuse repeated
        ids, so this does not happen in a build)."""
        part: list[bytes] = []
        for line in self.lines():
            part.append(line)
            if len(part) == per_part:
                yield render(part)
                part = []
        if part or not self._count:
            yield render(part)

    def to_json(self) -> bytes:
        """The whole map as one JSON object (small maps, and tests)."""
        return render(list(self.lines()))

    def close(self) -> None:
        self._file.close()
