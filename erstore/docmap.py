"""The document map of one build (document id -> window keys), spilled to a temporary file.

`index/<build>.docs.json` maps every corpus document to its windows, so it grows with the
corpus; holding it as a Python dict cost ~200 bytes per document for the whole build. Here
entries go to an unnamed temporary file as they come (one JSON line each) and are read back
once, at commit, to write the same JSON object as before (in corpus order). Memory stays a file buffer.

Not here: parsing or checking the map on read (the store does that).
"""

from __future__ import annotations

import json
import tempfile


class DocMap:
    """Append-only (doc id, keys) entries on disk; `to_json()` renders the docs.json object."""

    def __init__(self) -> None:
        # Unnamed and removed by the OS when closed (close() or garbage collection).
        self._file = tempfile.TemporaryFile(mode="w+b", prefix="erstore-docs-")  # noqa: SIM115
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, doc_id: str, keys: list[str]) -> None:
        self._file.write(json.dumps([doc_id, keys]).encode() + b"\n")
        self._count += 1

    def to_json(self) -> bytearray:
        """The JSON object {doc id: [keys]} of every entry, in the order added.

        A repeated id appears twice and JSON readers keep the last, as the dict this replaced
        did (corpus readers refuse repeated ids, so this does not happen in a build).
        """
        self._file.flush()
        self._file.seek(0)
        out = bytearray(b"{")
        for line in self._file:
            doc_id, keys = json.loads(line)
            if len(out) > 1:
                out += b", "
            out += json.dumps(doc_id).encode() + b": " + json.dumps(keys).encode()
        out += b"}"
        self._file.seek(0, 2)
        return out  # not copied into bytes: at corpus scale this is the largest object of a commit

    def close(self) -> None:
        self._file.close()
