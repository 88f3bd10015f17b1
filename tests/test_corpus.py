"""erstore.corpus: every input format streams the same documents; shards partition them; bad input is named."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from erstore.corpus import (
    DEFAULT_CORPUS,
    Document,
    check_corpus,
    iter_corpus,
    read_corpus,
)
from erstore.corpus_files import BLOCK_ROWS
from erstore.corpus_rows import SeenIds
from erstore.errors import InvalidInputError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pcsv = pytest.importorskip("pyarrow.csv")

N = 600
ROWS = [{"id": f"doc-{i:04d}", "text": f"Document number {i}, with a comma and \"quotes\".",
         "q": f"Question {i}?", "words": ["word", str(i), "end"]} for i in range(N)]


def _table():
    return pa.Table.from_pylist(ROWS)


def _jsonl_bytes(rows=ROWS) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write(folder: Path, kind: str) -> Path:
    """The ROWS corpus as one file (or folder) of `kind`."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        (p := folder / "c.jsonl").write_bytes(_jsonl_bytes())
    elif kind == "jsonl.gz":
        (p := folder / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes()))
    elif kind == "jsonl.zst":
        (p := folder / "c.jsonl.zst").write_bytes(zstandard.compress(_jsonl_bytes()))
    elif kind == "ndjson.bz2":
        (p := folder / "c.ndjson.bz2").write_bytes(bz2.compress(_jsonl_bytes()))
    elif kind == "csv":
        pcsv.write_csv(_table().drop_columns(["words"]), p := folder / "c.csv")
    elif kind == "csv.gz":
        pcsv.write_csv(_table().drop_columns(["words"]), folder / "plain.csv")
        (p := folder / "c.csv.gz").write_bytes(gzip.compress((folder / "plain.csv").read_bytes()))
        (folder / "plain.csv").unlink()
    elif kind == "tsv":
        pcsv.write_csv(_table().drop_columns(["words"]), p := folder / "c.tsv",
                       pcsv.WriteOptions(delimiter="\t"))
    elif kind == "parquet":
        pq.write_table(_table(), p := folder / "c.parquet", row_group_size=64)
    elif kind == "arrow-file":
        with pa.ipc.new_file(p := folder / "c.arrow", _table().schema) as w:
            for b in _table().to_batches(max_chunksize=50):
                w.write_batch(b)
    elif kind == "arrow-stream":
        with pa.ipc.new_stream(p := folder / "c.arrow", _table().schema) as w:
            for b in _table().to_batches(max_chunksize=70):
                w.write_batch(b)
    elif kind == "datasets":
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(ROWS).save_to_disk(p := folder / "ds", max_shard_size="20KB")
        assert len(list(p.glob("*.arrow"))) > 1  # several files: row numbers must run across them
    else:
        raise AssertionError(kind)
    return p


FIELDED = ["jsonl", "jsonl.gz", "jsonl.zst", "ndjson.bz2", "csv", "csv.gz", "tsv", "parquet", "arrow-file",
           "arrow-stream", "datasets"]


@pytest.mark.parametrize("kind", FIELDED)
def test_every_format_yields_the_same_documents_with_the_same_field_options(tmp_path, kind):
    path = write(tmp_path, kind)
    docs = read_corpus(path)
    assert docs == [Document(str(i), r["text"]) for i, r in enumerate(ROWS)]  # ids: row/line numbers
    fielded = read_corpus(path, id_field="id", pair_field="q", limit=5)
    assert fielded == [Document(r["id"], r["text"], r["q"]) for r in ROWS[:5]]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow-stream", "datasets"])
def test_words_field_gives_words_and_their_joined_text(tmp_path, kind):
    path = write(tmp_path, kind)
    [doc] = read_corpus(path, words_field="words", text_field="absent", limit=1)
    assert doc == Document("0", "word 0 end", None, ("word", "0", "end"))
    [doc] = read_corpus(path, words_field="words", limit=1)  # text field present: kept as is
    assert doc.text == ROWS[0]["text"] and doc.words == ("word", "0", "end")


@pytest.mark.parametrize("kind", [*FIELDED, "text"])
@pytest.mark.parametrize("world", [2, 3, 7])
def test_shards_partition_the_corpus_with_global_ids(tmp_path, kind, world):
    if kind == "text":
        path = tmp_path / "c.txt"
        path.write_text("".join(r["text"] + ("\n\n" if i % 50 == 0 else "\n") for i, r in enumerate(ROWS)))
        expected = read_corpus(path)
    else:
        path = write(tmp_path, kind)
        expected = read_corpus(path)
    shards = [list(iter_corpus(path, shard=(r, world))) for r in range(world)]
    merged = sorted((d for s in shards for d in s), key=lambda d: int(d.id))
    assert merged == expected
    assert sum(len(s) for s in shards) == len(expected)  # disjoint


def test_a_rank_does_not_parse_the_other_ranks_bytes(tmp_path):
    """Rank 0 of 2 never reads the second half of a JSONL file or the last row groups of a Parquet file."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(_jsonl_bytes(ROWS[:580]) + b'{"text": broken\n' + _jsonl_bytes(ROWS[580:]))
    assert len(list(iter_corpus(path, shard=(0, 2)))) > 250
    with pytest.raises(InvalidInputError, match=r"c\.jsonl:581: malformed JSON"):
        list(iter_corpus(path, shard=(1, 2)))

    rows = [dict(r) for r in ROWS]
    rows[-1]["text"] = ""  # invalid, in the last row group
    pq.write_table(pa.Table.from_pylist(rows), p := tmp_path / "c.parquet", row_group_size=100)
    assert [d.id for d in iter_corpus(p, shard=(0, 2))] == [str(i) for i in range(300)]
    with pytest.raises(InvalidInputError, match=r"c\.parquet, row 599: field 'text' must be a non-empty"):
        list(iter_corpus(p, shard=(1, 2)))


def test_many_small_files_are_whole_units_and_limit_is_global(tmp_path):
    for k in range(6):
        (tmp_path / "parts").mkdir(exist_ok=True)
        (tmp_path / "parts" / f"p{k}.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(ROWS[k * 10 : k * 10 + 10])))
    (tmp_path / "parts" / "README.md").write_text("not a corpus file: skipped in folders")
    docs = read_corpus(tmp_path / "parts")
    assert [d.id for d in docs[:2]] == ["p0.jsonl.gz:0", "p0.jsonl.gz:1"] and len(docs) == 60
    shards = [list(iter_corpus(tmp_path / "parts", shard=(r, 3))) for r in range(3)]
    assert sorted(d.id for s in shards for d in s) == sorted(d.id for d in docs)
    limited = [list(iter_corpus(tmp_path / "parts", limit=7, shard=(r, 3))) for r in range(3)]
    assert sorted(d.id for s in limited for d in s) == sorted(d.id for d in docs[:7])
    globbed = read_corpus(str(tmp_path / "parts" / "p[01].jsonl.gz"))
    assert [d.id for d in globbed] == [d.id for d in docs[:20]]


def test_in_memory_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [r["text"] for r in ROWS]
    expected = [Document(str(i), t) for i, t in enumerate(texts)]
    assert read_corpus(texts) == expected
    assert read_corpus(t for t in texts) == expected  # a generator, streamed once
    assert read_corpus([{"body": t} for t in texts], text_field="body") == expected
    assert read_corpus(datasets.Dataset.from_list(ROWS)) == expected
    assert read_corpus(_table()) == expected
    iterable = datasets.IterableDataset.from_generator(lambda: iter(ROWS))
    assert read_corpus(iterable, id_field="id", limit=3) == [Document(r["id"], r["text"]) for r in ROWS[:3]]
    for source in (datasets.Dataset.from_list(ROWS), iterable, texts):
        shards = [list(iter_corpus(source, shard=(r, 4))) for r in range(4)]
        assert sorted((d for s in shards for d in s), key=lambda d: int(d.id)) == expected
    with pytest.raises(InvalidInputError, match=r"splits train, test; pass one split"):
        read_corpus(datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test":
                                          datasets.Dataset.from_list(ROWS)}))
    with pytest.raises(InvalidInputError, match=r"no column 'body' \(columns: id, text, q, words\)"):
        read_corpus(datasets.Dataset.from_list(ROWS), text_field="body")


def test_check_corpus_does_not_consume_a_generator_and_catches_field_errors(tmp_path):
    gen = (t for t in ["one", "two"])
    check_corpus(gen)
    assert [d.text for d in iter_corpus(gen)] == ["one", "two"]
    check_corpus(DEFAULT_CORPUS)
    check_corpus(write(tmp_path, "parquet"), id_field="id")
    with pytest.raises(InvalidInputError, match=r"c\.parquet: no column 'doc'"):
        check_corpus(tmp_path / "c.parquet", id_field="doc")
    with pytest.raises(InvalidInputError, match="holds no documents"):
        check_corpus(write_text(tmp_path / "empty.txt", "\n\n"))


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "content", "match"), [
    ("bad.txt", b"fine\ncaf\xe9 au lait\n", r"bad\.txt:2: not valid UTF-8 \(byte 0xe9 at column 4\); convert"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not valid UTF-8"),
    ("bad.csv", b"text\nok\ncaf\xe9\n", r"bad\.csv:3: not valid UTF-8"),
    ("bad.jsonl.gz", gzip.compress(b'{"text": "ok"}\n\xff\n'), r"bad\.jsonl\.gz:2: not valid UTF-8"),
    ("notes.docx", b"PK\x03\x04", r"notes\.docx: unknown corpus file type '\.docx'; supported: .*\.csv.*\.parquet"),
    ("data.parquet.gz", b"x", r"compress internally"),
    ("rows.json", b'[{"text": "a"}]\n', r"rows\.json:1: expected a JSON object \(JSON Lines"),
    ("c.csv", b"body,other\nx,y\n", r"c\.csv: no column 'text' \(columns: body, other\); name the right one"),
    ("c.csv", b"text\na,b\n", r"c\.csv: cannot parse as CSV"),
    ("broken.parquet", b"PAR1 not really", r"broken\.parquet is not a readable Parquet file"),
])
def test_bad_files_are_named_with_the_fix(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InvalidInputError, match=match):
        list(iter_corpus(tmp_path / name))


def test_csv_is_not_read_as_plain_text(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('text,label\n"Hello, world",1\n"Two\nlines",0\n')
    assert read_corpus(path) == [Document("0", "Hello, world"), Document("1", "Two\nlines")]
    # --format overrides the extension, for every file
    assert read_corpus(path, format="text")[0].text == "text,label"


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(InvalidInputError, match="unknown corpus format 'yaml'"):
        read_corpus(write(tmp_path, "jsonl"), format="yaml")
    with pytest.raises(InvalidInputError, match="no corpus files match"):
        read_corpus(str(tmp_path / "*.nothing"))
    with pytest.raises(InvalidInputError, match="cannot read a corpus from dict"):
        read_corpus({"text": "a"})
    with pytest.raises(InvalidInputError, match=r"corpus, row 1: expected a string, a dict or a Document"):
        read_corpus(["a", 3])
    with pytest.raises(InvalidInputError, match="a plain text has no id field"):
        read_corpus(["a"], id_field="id")
    with pytest.raises(InvalidInputError, match=r"shard rank must be in \[0, world_size\)"):
        read_corpus(["a"], shard=(2, 2))


def test_duplicate_ids_are_found_across_blocks(tmp_path):
    rows = [{"id": f"x{i}", "text": "t"} for i in range(BLOCK_ROWS + 10)] + [{"id": "x7", "text": "again"}]
    path = tmp_path / "c.jsonl"
    path.write_bytes(_jsonl_bytes(rows))
    with pytest.raises(InvalidInputError, match=rf"c\.jsonl:{len(rows)}: duplicate document id 'x7'"):
        list(iter_corpus(path, id_field="id"))
    assert len(read_corpus(path, limit=len(rows) - 1, id_field="id")) == len(rows) - 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40).map(str), max_size=30), max_size=8))
def test_seen_ids_reports_exactly_the_first_repeat(blocks):
    seen, reference = SeenIds(), set()
    for block in blocks:
        expected = -1
        local = set()
        for i, x in enumerate(block):
            if x in reference or x in local:
                expected = i
                break
            local.add(x)
        assert seen.add(block) == expected
        if expected >= 0:
            return
        reference |= local
    assert sum(len(r) for r in seen._runs) == len(reference)
    assert all(np.all(r[1:] > r[:-1]) for r in seen._runs)


def test_without_pyarrow_the_error_names_the_extra(tmp_path):
    """A real interpreter in which pyarrow cannot be imported: JSONL still reads, Parquet names the extra."""
    import subprocess
    import sys

    path = write(tmp_path, "parquet")
    (tmp_path / "c.jsonl").write_bytes(_jsonl_bytes(ROWS[:3]))
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "from erstore.corpus import read_corpus\n"
            f"assert len(read_corpus({str(tmp_path / 'c.jsonl')!r})) == 3\n"
            f"read_corpus({str(path)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "needs pyarrow; install it with pip install 'erstore[formats]'" in proc.stderr
