"""Corpus files: which files a corpus source names, their format, and one streaming reader per format.

A source is a file, a folder (every file in it with a known extension; or a `datasets`
`save_to_disk` folder) or a glob pattern. The format comes from the extension (after an optional
`.gz` / `.zst` / `.bz2` compression suffix), or from `format=` for every file. Readers yield
`Block`s of rows, never a whole file: JSONL and plain text line by line (file:line errors),
CSV/TSV, Parquet and Arrow through pyarrow in record batches, only the columns asked for.

Splittable files offer `units` so one rank of a multi-node build reads only its share: byte
ranges of an uncompressed JSONL/text file (aligned to line starts; the line number of a range's
first line is found by counting newlines before it, which is a memchr, not a parse), Parquet
row groups, Arrow record batches. Compressed files and CSV cannot be entered in the middle.

Not here: building `Document`s from rows (erstore.corpus_rows), remote URLs (hf://, s3://: download
first), schema inference beyond "this column exists and holds text".
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erstore.errors import InvalidInputError

FORMATS = ("jsonl", "text", "csv", "tsv", "parquet", "arrow")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text",
              ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow",
              ".feather": "arrow", ".ipc": "arrow"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
COLUMNAR = ("csv", "tsv", "parquet", "arrow")
BLOCK_ROWS = 4096
_BATCH_BYTES = 4 << 20  # pyarrow CSV block size: a few MB per batch keeps memory flat


def supported() -> str:
    """The list of supported corpus inputs, for error messages."""
    exts = ", ".join(sorted(EXTENSIONS))
    return (f"{exts} (optionally compressed: {', '.join(sorted(COMPRESSIONS))}), a folder of such files, "
            "a `datasets` save_to_disk folder or a glob pattern; or force one with --format "
            f"({'|'.join(FORMATS)})")


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus; document ids are `prefix + str(row_offset + row)` unless an id field is given."""

    path: Path
    format: str
    compression: str | None = None
    prefix: str = ""
    row_offset: int = 0

    @property
    def splittable(self) -> bool:
        return self.compression is None and self.format not in ("csv", "tsv")

    @property
    def line_based(self) -> bool:
        return self.format in ("jsonl", "text")


@dataclass(frozen=True)
class Block:
    """Consecutive rows of one file (or in-memory source): `rows` are their row/line indices
    (0-based), with either row-wise `records` or `columns` (name -> Arrow array or list, one
    value per row).
    `strict`: records must be mappings (JSON objects), not strings."""

    rows: Sequence[int]
    where: str
    line_based: bool = False
    strict: bool = False
    records: list[Any] | None = None
    columns: dict[str, list[Any]] | None = None
    prefix: str = ""
    offset: int = 0

    def location(self, i: int) -> str:
        return f"{self.where}:{self.rows[i] + 1}" if self.line_based else f"{self.where}, row {self.rows[i]}"


def _format_of(path: Path, forced: str | None) -> tuple[str | None, str | None]:
    """(format, compression) of a file from its extension; format None if unknown."""
    suffix = path.suffix.lower()
    compression = COMPRESSIONS.get(suffix)
    inner = Path(path.stem).suffix.lower() if compression else suffix
    fmt = forced or EXTENSIONS.get(inner)
    if compression and fmt in ("parquet", "arrow"):
        raise InvalidInputError(f"{path}: {fmt} files compress internally and cannot be read {compression}-"
                                f"compressed; decompress it first")
    return fmt, compression


def discover(source: str | os.PathLike[str], forced: str | None = None) -> list[CorpusFile]:
    """The files of a corpus source, in a deterministic (sorted) order."""
    if forced is not None and forced not in (*FORMATS, "datasets"):
        raise InvalidInputError(f"unknown corpus format {forced!r}; choose one of {', '.join((*FORMATS, 'datasets'))}")
    text = os.fspath(source)
    p = Path(text).expanduser()
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = sorted(d.name for d in p.iterdir() if (d / "state.json").is_file())
            raise InvalidInputError(f"{p} is a datasets DatasetDict with splits {', '.join(splits) or 'none'}; "
                                    f"pass one split, e.g. --corpus {p / (splits[0] if splits else 'train')}")
        if (p / "state.json").is_file() or forced == "datasets":
            return _datasets_folder(p)
        files = sorted(f for f in p.rglob("*") if f.is_file() and not _hidden(f.relative_to(p)))
        return _typed(files, p, forced, folder=True)
    if p.is_file():
        fmt, compression = _format_of(p, forced)
        if fmt is None or fmt == "datasets":
            raise InvalidInputError(f"{p}: unknown corpus file type {p.suffix or '(no extension)'!r}; "
                                    f"supported: {supported()}")
        return [CorpusFile(p, fmt, compression)]
    if glob.has_magic(text):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(f))
        if not files:
            raise InvalidInputError(f"no corpus files match {text!r}; check the pattern")
        fixed = []
        for part in Path(os.path.expanduser(text)).parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        return _typed(files, Path(*fixed) if fixed else Path("."), forced, folder=False)
    raise InvalidInputError(f"corpus {text!r} does not exist; pass --corpus an existing file, folder or "
                            "glob pattern")


def _hidden(rel: Path) -> bool:
    return any(part.startswith((".", "_")) for part in rel.parts)


def _typed(files: list[Path], base: Path, forced: str | None, *, folder: bool) -> list[CorpusFile]:
    out = []
    for f in files:
        fmt, compression = _format_of(f, forced)
        if fmt is None:
            if folder:
                continue  # READMEs, licences, .gitattributes of a downloaded dataset repository
            raise InvalidInputError(f"{f}: unknown corpus file type {f.suffix or '(no extension)'!r}; "
                                    f"supported: {supported()}")
        out.append(CorpusFile(f, fmt, compression, prefix=f"{f.relative_to(base).as_posix()}:"))
    if not out:
        raise InvalidInputError(f"{base} holds no corpus files; supported: {supported()}")
    return out


def _datasets_folder(p: Path) -> list[CorpusFile]:
    """The Arrow files of a `Dataset.save_to_disk` folder, with global row numbers across them."""
    try:
        state = json.loads((p / "state.json").read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"{p}/state.json is not a datasets save_to_disk state ({e}); "
                                "save the dataset again with Dataset.save_to_disk") from e
    out, offset = [], 0
    for name in names:
        f = p / name
        if not f.is_file() or Path(name).is_absolute() or ".." in Path(name).parts:
            raise InvalidInputError(f"{p}: data file {name!r} listed in state.json is missing")
        out.append(CorpusFile(f, "arrow", None, "", offset))
        offset += sum(n for _, n, _ in _arrow_batches(f))
    return out


# -- opening -------------------------------------------------------------------------------------
def _pyarrow(what: str) -> Any:
    try:
        import pyarrow
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError as e:
        raise InvalidInputError(f"reading {what} corpora needs pyarrow; install it with "
                                "pip install 'erstore[formats]'") from e
    return pyarrow


def open_binary(f: CorpusFile) -> io.BufferedIOBase:
    """The file's bytes, decompressed (streaming; stdlib gzip/bz2, zstandard)."""
    if f.compression == "gzip":
        return gzip.open(f.path, "rb")  # type: ignore[return-value]
    if f.compression == "bz2":
        return bz2.open(f.path, "rb")  # type: ignore[return-value]
    if f.compression == "zstd":
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(f.path, "rb"), closefd=True)  # noqa: SIM115 (closed by the reader)
        return io.BufferedReader(raw, 1 << 20)  # type: ignore[arg-type]
    return open(f.path, "rb", buffering=1 << 20)


# -- units (what a rank can read without the rest) -----------------------------------------------
def units(f: CorpusFile, world: int) -> list[tuple[Any, float]]:
    """(unit, weight in bytes) of a splittable file: byte ranges, row groups or record batches."""
    if f.line_based:
        size = f.path.stat().st_size
        return [((size * r // world, size * (r + 1) // world), size / world) for r in range(world)]
    if f.format == "parquet":
        meta = _pyarrow("Parquet").parquet.ParquetFile(f.path).metadata
        return [(g, float(meta.row_group(g).total_byte_size)) for g in range(meta.num_row_groups)]
    return [(i, float(nbytes)) for i, _, nbytes in _arrow_batches(f.path)]


def row_count(f: CorpusFile) -> int:
    """Rows of a Parquet or Arrow file, from its metadata (no data is read)."""
    if f.format == "parquet":
        return int(_pyarrow("Parquet").parquet.ParquetFile(f.path).metadata.num_rows)
    return sum(n for _, n, _ in _arrow_batches(f.path))


def _arrow_batches(path: Path) -> list[tuple[int, int, int]]:
    """(index, rows, bytes) of each record batch (memory-mapped: metadata only, no copy)."""
    return [(i, b.num_rows, b.nbytes) for i, b in enumerate(_arrow_reader(path))]


def _arrow_reader(path: Path) -> Iterator[Any]:
    pa = _pyarrow("Arrow")
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            return iter(pa.ipc.open_stream(pa.memory_map(str(path))))  # datasets writes the stream format
        except pa.ArrowInvalid as e:
            raise InvalidInputError(f"{path} is not an Arrow IPC file or stream ({e})") from e


# -- reading --------------------------------------------------------------------------------------
def read(f: CorpusFile, columns: list[str] | None, *, optional: frozenset[str] = frozenset(),
         parts: list[Any] | None = None, stripe: tuple[int, int] | None = None) -> Iterator[Block]:
    """Blocks of `f`'s rows: all of them, only the `parts` (units) given, or every stripe[1]-th
    row starting at stripe[0] (for a file a rank cannot enter in the middle).

    Columnar formats read only `columns` (those in `optional` may be absent; CSV reads them as
    text), or every column with its own type when `columns` is None."""
    if f.line_based:
        yield from _read_lines(f, parts, stripe)
    elif f.format in ("csv", "tsv"):
        yield from _read_csv(f, columns, optional, stripe)
    elif f.format == "parquet":
        yield from _read_parquet(f, columns, optional, parts)
    else:
        yield from _read_arrow(f, columns, optional, parts)


def _lines(f: CorpusFile, parts: list[tuple[int, int]] | None,
           stripe: tuple[int, int] | None) -> Iterator[tuple[int, bytes]]:
    """(0-based line number, raw line) of the lines in `parts` (a line belongs to the range
    holding its first byte), or of every line."""
    with open_binary(f) as fh:
        if parts is None:
            for lineno, line in enumerate(fh):
                if stripe is None or lineno % stripe[1] == stripe[0]:
                    yield lineno, line
            return
        lineno, counted = 0, 0
        for start, end in parts:
            if start > 0:
                fh.seek(start - 1)
                if fh.read(1) != b"\n":
                    fh.readline()  # the partial line belongs to the previous range
            pos = fh.tell()
            lineno += _count_newlines(fh, counted, pos)
            fh.seek(pos)
            while pos < end:
                line = fh.readline()
                if not line:
                    break
                yield lineno, line
                lineno += 1
                pos += len(line)
            counted = pos


def _count_newlines(fh: Any, start: int, stop: int) -> int:
    fh.seek(start)
    n, left = 0, stop - start
    while left > 0:
        chunk = fh.read(min(left, 16 << 20))
        if not chunk:
            break
        n += chunk.count(b"\n")
        left -= len(chunk)
    return n


def _utf8_error(line: bytes, e: UnicodeDecodeError, where: str) -> InvalidInputError:
    return InvalidInputError(
        f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); convert the "
        "file to UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"
    )


def _read_lines(f: CorpusFile, parts: Any, stripe: Any) -> Iterator[Block]:
    where = str(f.path)
    rows: list[int] = []
    values: list[Any] = []
    jsonl = f.format == "jsonl"
    for lineno, raw in _lines(f, parts, stripe):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(raw, e, f"{where}:{lineno + 1}") from e
        if not text.strip():
            continue
        if jsonl:
            try:
                values.append(json.loads(text))
            except ValueError as e:
                hint = " (a .json corpus must hold one object per line: JSON Lines)" if text.lstrip()[:1] == "[" else ""
                raise InvalidInputError(f"{where}:{lineno + 1}: malformed JSON ({e}){hint}; fix or remove "
                                        "the line") from e
        else:
            values.append(text.rstrip("\r\n"))
        rows.append(lineno)
        if len(rows) >= BLOCK_ROWS:
            yield Block(rows, where, True, jsonl, records=values, prefix=f.prefix, offset=f.row_offset)
            rows, values = [], []
    if rows:
        yield Block(rows, where, True, jsonl, records=values, prefix=f.prefix, offset=f.row_offset)


def _check_columns(f: CorpusFile, names: list[str], columns: list[str] | None, optional: frozenset[str]) -> list[str]:
    """The requested columns this file has (all of them for None); a clear error for a missing one."""
    if columns is None:
        return list(names)
    for c in columns:
        if c not in names and c not in optional:
            raise InvalidInputError(f"{f.path}: no column {c!r} (columns: {', '.join(names) or 'none'}); "
                                    "name the right one with --text-field / --pair-field / --id-field / "
                                    "--words-field")
    return [c for c in columns if c in names]


def _columns_of(batch: Any, f: CorpusFile, names: list[str]) -> dict[str, Any]:
    """The batch's columns as Arrow arrays (converted to Python once, in erstore.corpus_rows)."""
    pa = _pyarrow("columnar")
    out = {}
    for name in names:
        col = batch.column(name)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            raise InvalidInputError(f"{f.path}: column {name!r} holds bytes, not text (is it UTF-8?); "
                                    "convert the file to UTF-8 text")
        out[name] = col
    return out


def _read_csv(f: CorpusFile, columns: list[str] | None, optional: frozenset[str], stripe: Any) -> Iterator[Block]:
    pa = _pyarrow("CSV")
    from pyarrow import csv

    delimiter = "\t" if f.format == "tsv" else ","
    parse = csv.ParseOptions(delimiter=delimiter, newlines_in_values=True)

    def reader(include: list[str] | None) -> Any:
        stream = pa.input_stream(str(f.path), compression=f.compression)
        types = {c: pa.string() for c in (include or []) if columns is not None}
        convert = csv.ConvertOptions(column_types=types, include_columns=include)
        return csv.open_csv(stream, read_options=csv.ReadOptions(block_size=_BATCH_BYTES),
                            parse_options=parse, convert_options=convert)

    try:
        present = _check_columns(f, reader(None).schema.names, columns, optional)
        first = 0
        for batch in reader(present):
            n = batch.num_rows
            if stripe is not None:
                keep = [i for i in range(n) if (first + i) % stripe[1] == stripe[0]]
                batch = batch.take(pa.array(keep, type=pa.int64()))
                rows: Sequence[int] = [first + i for i in keep]
            else:
                rows = range(first, first + n)
            first += n
            if len(rows):
                yield Block(rows, str(f.path), columns=_columns_of(batch, f, present), prefix=f.prefix,
                            offset=f.row_offset)
    except pa.ArrowInvalid as e:
        if "UTF8" in str(e):
            raise InvalidInputError(_first_bad_utf8(f)) from e
        raise InvalidInputError(f"{f.path}: cannot parse as {f.format.upper()} ({e}); fix the file or "
                                "pick the format with --format") from e


def _first_bad_utf8(f: CorpusFile) -> str:
    with open_binary(f) as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return str(_utf8_error(line, e, f"{f.path}:{lineno}"))
    return f"{f.path}: not valid UTF-8; convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"


def _read_parquet(f: CorpusFile, columns: list[str] | None, optional: frozenset[str],
                  parts: list[int] | None) -> Iterator[Block]:
    pq = _pyarrow("Parquet").parquet
    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for damaged files
        raise InvalidInputError(f"{f.path} is not a readable Parquet file ({e})") from e
    present = _check_columns(f, pf.schema_arrow.names, columns, optional)
    meta = pf.metadata
    starts = [0]
    for g in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(g).num_rows)
    for g in range(meta.num_row_groups) if parts is None else parts:
        first = starts[g]
        for batch in pf.iter_batches(batch_size=BLOCK_ROWS, row_groups=[g], columns=present):
            yield Block(range(first, first + batch.num_rows), str(f.path), columns=_columns_of(batch, f, present),
                        prefix=f.prefix, offset=f.row_offset)
            first += batch.num_rows


def _read_arrow(f: CorpusFile, columns: list[str] | None, optional: frozenset[str],
                parts: list[int] | None) -> Iterator[Block]:
    wanted = None if parts is None else set(parts)
    first, present = 0, None
    for i, batch in enumerate(_arrow_reader(f.path)):
        if present is None:
            present = _check_columns(f, batch.schema.names, columns, optional)
        n = batch.num_rows
        if wanted is None or i in wanted:
            for s in range(0, n, BLOCK_ROWS):
                part = batch.slice(s, BLOCK_ROWS)
                yield Block(range(first + s, first + s + part.num_rows), str(f.path),
                            columns=_columns_of(part, f, present), prefix=f.prefix, offset=f.row_offset)
        first += n
