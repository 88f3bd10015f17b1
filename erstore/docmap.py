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
        # Each line is one finished JSON member, `"id": ["key", ...]`: the id is JSON-escaped (so
        # no raw newline occurs) and keys are hex, so `to_json` joins lines without parsing them.
        members = '"' + '", "'.join(keys) + '"' if keys else ""
        self._file.write(f"{json.dumps(doc_id)}: [{members}]\n".encode())
        self._count += 1

    def to_json(self) -> bytearray:
        """The JSON object {doc id: [keys]} of every entry, in the order added.

        A repeated id appears twice and JSON readers keep the last, as the dict this replaced
        did (corpus readers refuse repeated ids, so this does not happen in a build).
        """
        self._file.flush()
        self._file.seek(0)
        out = bytearray(b"{")
        while block := self._file.read(1 << 22):  # in blocks: the map is held once, not three times
            out += block.replace(b"\n", b", ")
        self._file.seek(0, 2)
        if out.endswith(b", "):
            del out[-2:]
        out += b"}"
        return out  # not copied into bytes: at corpus scale this is the largest object of a commit

    def close(self) -> None:
        self._file.close()
