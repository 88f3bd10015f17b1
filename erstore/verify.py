"""`erstore verify`: check every stored sequence against what was recorded at write time.

For each sequence of a version it re-reads the states and token ids, recomputes the xxh3-64
checksum recorded by the writer, and recomputes the key from the stored token ids, so both
damaged chunks and an index that points at the wrong rows are caught. A chunk that can no
longer be decoded (truncated, bad zstd frame, zstd checksum mismatch) marks every sequence reading it
as corrupt. It also checks every file the version manifest records (size and xxh3) and the
document maps. Damage in erstore.json, a manifest or an index file already fails `erstore.open`.
It reads in batches of concurrent requests; it does not repair anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from erstore import progress as _progress
from erstore.errors import CorruptStoreError
from erstore.keys import join_key, window_key
from erstore.store import Store
from erstore.validate import read_checked
from erstore.writer import checksum

BATCH = 256


@dataclass
class VerifyReport:
    store: str
    version: int | None
    checked: int = 0
    corrupt: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _check_files(store: Store, report: VerifyReport, reporter: _progress.Reporter) -> None:
    """Every file the version's manifest records (size and xxh3), and the document maps."""
    manifest = store.manifest
    if manifest is None:
        return
    with reporter.phase("files", total=len(manifest.files), unit="files") as phase:
        for relpath in sorted(manifest.files):
            try:
                read_checked(store.location, manifest, relpath, cap=1 << 40, required=True)
            except CorruptStoreError as e:
                report.corrupt.append({"key": relpath, "problem": str(e)})
            phase.update()
    try:
        store.documents()
    except CorruptStoreError as e:
        report.corrupt.append({"key": "index/*.docs.json", "problem": str(e)})


def verify(store: Store, *, progress: bool | str = True) -> VerifyReport:
    """Check every sequence of `store`'s version; never raises for damaged data, reports it.

    `progress`: True / a mode of `erstore.progress` reports the files and sequences checked on stderr.
    """
    reporter = _progress.reporter("verify", progress)
    report = VerifyReport(str(store.location.url), store.version)
    _check_files(store, report, reporter)
    records = store.index.records
    with reporter.phase("sequences", total=len(records), unit="sequences",
                        detail=lambda: f"{len(report.corrupt):,} corrupt") as phase:
        _check_sequences(store, records, report, phase)
    return report


def _check_sequences(store: Store, records: np.ndarray, report: VerifyReport, phase: _progress.Phase) -> None:
    for start in range(0, len(records), BATCH):
        positions = np.arange(start, min(start + BATCH, len(records)))
        futures = []
        for rec in records[positions]:
            try:
                start = int(rec["row"])
                parts, tokens = store._array(int(rec["array"])).read(start, start + int(rec["length"]))
                futures.append((rec, parts, tokens))
            except Exception as e:  # noqa: BLE001 - a broken array is reported, not raised
                futures.append((rec, e, None))
        for rec, fs, ft in futures:
            key = join_key(rec["hi"], rec["lo"])
            report.checked += 1
            if isinstance(fs, Exception):
                report.corrupt.append({"key": key, "problem": f"cannot open its array: {fs}"})
                continue
            try:
                parts, tokens = {name: f.result() for name, f in fs.items()}, ft.result()
            except Exception as e:  # noqa: BLE001
                report.corrupt.append({"key": key, "problem": f"unreadable chunk: {e}"})
                continue
            if checksum(parts, tokens) != int(rec["checksum"]):
                report.corrupt.append({"key": key, "problem": "checksum mismatch: stored bytes changed"})
            elif window_key(tokens, int(rec["boundary"])) != key:
                report.corrupt.append({"key": key, "problem": "token ids do not hash to the key"})
        phase.update(len(futures))
