"""Journals of a running build: which rows are durable, and how far its input is.

A build writes `journal/<build>/<seq>.idx` after each flush becomes durable: the index records
of the sequences it completed, in the index file encoding with a checksum of its own in the
header (no manifest records journals, and a damaged journal must never be adopted). When the
builder has told the writer that every window of the input documents before position P has
been appended (`StoreWriter.mark_input`), and those rows are durable, the journal also carries
the resume point `input`: P, an xxh3-128 digest of those documents as read (id, text, pair,
words), and the document-map lines of those documents, written just before as
`journal/<build>/<seq>.docs` (its size and checksum in the header).

A later build of the same store adopts every intact journal's records (no recompute) and, if
its input starts with the same P documents (same digest), skips them without tokenizing: their
document-map lines come from the journal, and their window keys rebuild the within-corpus
deduplication set. A resume point is offered only if every journal is intact and every build
it depended on (`needs`: records adopted from earlier killed builds) is still there, whole.

Not here: when to flush (`erstore.writer`) or how the input is read and skipped (`erstore.builder`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from erstore.errors import CorruptStoreError
from erstore.integrity import check_digest, check_name
from erstore.location import Location
from erstore.manifest import decode_index_file

MAX_JOURNAL_BYTES = 1 << 31  # a journal holds one flush's records (or, from old builds, more)


def journal_path(build: str, seq: int, suffix: str = ".idx") -> str:
    return f"journal/{build}/{seq:06d}{suffix}"


@dataclass(frozen=True)
class ResumePoint:
    """Input documents [0, documents) of an interrupted build are durable, documents included."""

    build: str
    documents: int
    digest: str
    docs: tuple[tuple[str, dict[str, Any]], ...]  # (relpath, file record) of its .docs pieces, in order


@dataclass
class Adopted:
    """What a new build takes over from interrupted ones."""

    parts: list[tuple[np.ndarray, list[str]]] = field(default_factory=list)  # (records, array ids)
    points: list[ResumePoint] = field(default_factory=list)
    records: dict[str, int] = field(default_factory=dict)  # build -> records adopted from its journals

    def read_docs(self, location: Location, point: ResumePoint) -> bytes:
        """The document-map lines of `point`'s documents, each piece checked."""
        out = []
        for relpath, record in point.docs:
            raw = location.read_capped(relpath, record["bytes"])
            where = f"{location.url}/{relpath}"
            if raw is None or len(raw) != record["bytes"]:
                raise CorruptStoreError(f"{where} is missing or truncated; rebuild without resuming")
            check_digest(raw, record["xxh3_64"], where)
            out.append(raw)
        return b"".join(out)


def adopt(location: Location) -> Adopted:
    """Read every journal of the store; keep the intact ones, warn about the others."""
    names = sorted(k for k in location.list("journal/") if k.endswith(".idx"))
    adopted = Adopted()
    by_build: dict[str, list[tuple[int, dict[str, Any] | None]]] = {}
    damaged = 0
    for name, raw in zip(names, location.read_many(names)):
        where = f"{location.url}/{name}"
        try:
            build = check_name(name.split("/")[1], where)
            seq = int(name.rsplit("/", 1)[1].removesuffix(".idx"))
            if raw is None or len(raw) > MAX_JOURNAL_BYTES:
                raise CorruptStoreError(f"{where} vanished or is too large")
            records, arrays, header = decode_index_file(raw, where, sealed=True)
        except (CorruptStoreError, ValueError, IndexError) as e:
            damaged += 1
            warnings.warn(f"not resuming from the damaged journal {where}: {e}", stacklevel=3)
            continue
        adopted.parts.append((records, arrays))
        adopted.records[build] = adopted.records.get(build, 0) + len(records)
        by_build.setdefault(build, []).append((seq, header))
    if damaged:
        return adopted  # rows of intact journals are adopted; the input is read from the start
    for build, journals in by_build.items():
        pieces: list[tuple[str, dict[str, Any]]] = []
        for i, (seq, header) in enumerate(sorted(journals, key=lambda j: j[0])):
            if seq != i:
                break  # a journal is missing: later resume points could lack its rows
            point = (header or {}).get("input")
            if not isinstance(point, dict):
                continue
            try:
                docs = point["docs"]
                pieces.append((journal_path(build, seq, ".docs"), {"bytes": int(docs["bytes"]),
                                                                   "xxh3_64": str(docs["xxh3_64"])}))
                needs = {str(b): int(n) for b, n in dict(point.get("needs", {})).items()}
                documents, digest = int(point["documents"]), str(point["digest"])
            except (KeyError, TypeError, ValueError, AttributeError):
                break
            if all(adopted.records.get(b, -1) == n for b, n in needs.items()):
                adopted.points.append(ResumePoint(build, documents, digest, tuple(pieces)))
    return adopted
