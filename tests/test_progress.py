"""Progress on stderr: the Reporter's modes, and every long CLI phase as a real subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from erstore.errors import InvalidInputError
from erstore.progress import Reporter, cli_mode, resolve
from tests.conftest import SENTENCES, write_jsonl


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# -- the reporter ---------------------------------------------------------------------------------
def test_lines_mode_prints_start_periodic_and_summary_lines():
    out = io.StringIO()
    r = Reporter("build", "lines", stream=out, interval=0)
    with r.phase("compute", total=10, unit="sequences", detail=lambda: "7 tokens") as p:
        p.update(4)
        p.update(6)
    with r.phase("read", unit="documents") as p:
        p.update(1)
    lines = lines_of(out)
    assert lines[0] == "build: compute started: 10 sequences"
    assert lines[1].startswith("build: compute 4/10 sequences (40%), ") and "eta " in lines[1]
    assert lines[1].endswith("; 7 tokens")
    assert lines[2].startswith("build: compute 10/10 sequences (100%)") and "eta" not in lines[2]
    assert lines[3].startswith("build: compute done: 10 sequences in ") and lines[3].endswith("; 7 tokens")
    # Unknown total: a count and a rate, no percentage.
    assert lines[4] == "build: read started"
    assert lines[5].startswith("build: read 1 document, ") and "%" not in lines[5]
    assert lines[6].startswith("build: read done: 1 document in ")


def test_lines_are_throttled_and_nothing_is_formatted_until_due():
    out = io.StringIO()
    calls = []
    r = Reporter("verify", "lines", stream=out, interval=3600)
    with r.phase("sequences", total=100_000, unit="sequences", detail=lambda: calls.append(1) or "x") as p:
        for _ in range(100_000):
            p.update()
    assert len(calls) == 1  # only the summary line asked for the detail
    assert [line.split(" ")[2] for line in lines_of(out)] == ["started:", "done:"]


def test_a_failed_phase_says_it_stopped():
    out = io.StringIO()
    with pytest.raises(RuntimeError), Reporter("copy", "lines", stream=out).phase("sequences", total=5,
                                                                                   unit="sequences") as p:
        p.update(2)
        raise RuntimeError("boom")
    assert lines_of(out)[-1].startswith("copy: sequences stopped after 2 sequences in ")


def test_a_closed_stderr_turns_lines_off_instead_of_failing_the_work():
    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError("the reader left")

    r = Reporter("build", "lines", stream=Gone(), interval=0)
    with r.phase("compute", total=3, unit="sequences") as p:
        p.update(3)
    assert r.mode == "off"


def test_off_mode_prints_nothing():
    out = io.StringIO()
    r = Reporter("build", False, stream=out, interval=0)
    with r.phase("compute", total=3) as p:
        p.update(3)
    r.say("hello")
    assert out.getvalue() == ""


def test_bar_mode_drives_tqdm():
    out = io.StringIO()
    r = Reporter("export", "bar", stream=out)
    with r.phase("parquet", total=10, unit="sequences", detail=lambda: "1.2 MB") as p:
        assert type(p._bar).__module__.startswith("tqdm")
        p.update(4)
        p.update(6)
    text = out.getvalue()
    assert "export parquet" in text and "10/10" in text and "100%" in text and "1.2 MB" in text
    assert "started" not in text and "done:" not in text  # the bar, not plain lines
    # A total that was too high (a --limit above the corpus size) ends the bar at the real count.
    out = io.StringIO()
    with Reporter("build", "bar", stream=out).phase("read", total=100, unit="documents") as p:
        p.update(7)
    assert "7/7" in out.getvalue().split("\r")[-1]


def test_modes_resolve_from_the_terminal_the_environment_and_the_cli(monkeypatch):
    monkeypatch.delenv("ERSTORE_PROGRESS", raising=False)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert resolve(True, Tty()) == "bar" and resolve(True, io.StringIO()) == "lines"
    assert resolve(False) == "off" and resolve("lines", Tty()) == "lines"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert cli_mode(quiet=True) == "off" and cli_mode(quiet=False) == "auto"
    assert cli_mode(quiet=False, as_json=True) == "off"  # scripts that merge stderr into the JSON they parse
    monkeypatch.setenv("ERSTORE_PROGRESS", "lines")
    assert resolve(True, Tty()) == "lines" and resolve("off") == "off"
    assert cli_mode(quiet=False, as_json=True) == "lines" and cli_mode(quiet=True) == "off"
    monkeypatch.setenv("ERSTORE_PROGRESS", "sometimes")
    with pytest.raises(InvalidInputError, match="ERSTORE_PROGRESS='sometimes' is not a progress mode"):
        resolve(True)
    monkeypatch.setenv("ERSTORE_PROGRESS", "lines")
    monkeypatch.setenv("ERSTORE_PROGRESS_SECONDS", "soon")
    with pytest.raises(InvalidInputError, match="ERSTORE_PROGRESS_SECONDS='soon' must be a number"):
        Reporter("build")


# -- every long CLI phase, as a real process with stderr on a pipe --------------------------------
def erstore_cli(*args, seconds="0", **env):
    environ = {k: v for k, v in os.environ.items() if k != "ERSTORE_PROGRESS"}
    environ.update({"HF_HUB_OFFLINE": "1", "ERSTORE_PROGRESS_SECONDS": seconds, **env})
    code = "import sys; from erstore.cli import main; sys.argv[0] = 'erstore'; main()"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def phases(stderr: str, command: str) -> dict[str, list[str]]:
    """Progress lines of `command` by phase name."""
    out: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        if line.startswith(f"{command}: "):
            words = line[len(command) + 2:].split(" ")
            name = " ".join(words[:2]) if words[:2] == ["load", "model"] else words[0]
            out.setdefault(name, []).append(line)
    return out


@pytest.mark.slow
def test_cli_phases_report_plain_lines_on_stderr_and_nothing_on_stdout(tiny_bert, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": s} for s in SENTENCES])
    store, copy, out = tmp_path / "s", tmp_path / "copy", tmp_path / "e.npz"
    build = erstore_cli("build", "--model", tiny_bert, "--corpus", corpus, "--store", store, "--layer", 2,
                        "--max-length", 64, "--batch-size", 2)
    seen = phases(build.stderr, "build")
    assert set(seen) == {"load model", "read", "compute", "commit"}, build.stderr
    for lines in seen.values():
        assert "started" in lines[0] and " done" in lines[-1], lines
    assert any(f"/{len(SENTENCES)} sequences (" in line for line in seen["compute"])  # total known once read
    assert seen["read"][-1].startswith(f"build: read done: {len(SENTENCES)} documents in ")
    n = len(SENTENCES)  # one short window each, all new
    assert seen["read"][-1].endswith(f"; tokenized {n} windows; 0 seen before or stored, {n} to compute")
    assert "build:" not in build.stdout and build.stdout.startswith(f"store {store} (layer 2): version 1")

    checks = [(("verify", store), {"files", "sequences"}),
              (("copy", store, copy), {"sequences", "commit"}),
              (("export", store, "--format", "npz", "--out", out), {"npz"}),
              (("gc", store, "--dry-run"), {"scan", "unreferenced"})]
    for args, expected in checks:
        proc = erstore_cli(*args)
        seen = phases(proc.stderr, args[0])
        assert set(seen) == expected, proc.stderr
        assert all(" done" in lines[-1] for lines in seen.values()), proc.stderr
        assert f"{args[0]}:" not in proc.stdout and proc.stdout.strip(), proc.stdout

    # --quiet is fully quiet; --json keeps stdout pure JSON and writes no plain lines ...
    proc = erstore_cli("build", "--model", tiny_bert, "--corpus", corpus, "--store", store, "--layer", 2,
                       "--max-length", 64, "--quiet")
    assert proc.stderr == "" and "nothing new" in proc.stdout
    assert erstore_cli("export", store, "--format", "npz", "--out", out, "--overwrite", "--quiet").stderr == ""
    proc = erstore_cli("verify", store, "--json")
    assert proc.stderr == "" and json.loads(proc.stdout)["ok"]
    # ... unless ERSTORE_PROGRESS asks for them; at the default interval (10 s) a phase this short
    # prints its start and end lines only.
    proc = erstore_cli("verify", store, "--json", seconds="", ERSTORE_PROGRESS="lines")
    assert json.loads(proc.stdout)["ok"]
    assert [len(lines) for lines in phases(proc.stderr, "verify").values()] == [2, 2], proc.stderr


# -- totals known cheaply -------------------------------------------------------------------------
def test_document_count_is_known_from_metadata_and_sized_sources_only(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from erstore.corpus import document_count

    pq.write_table(pa.table({"text": SENTENCES}), tmp_path / "c.parquet")
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"text": s} for s in SENTENCES])
    assert document_count(tmp_path / "c.parquet") == len(SENTENCES)
    assert document_count(tmp_path / "c.parquet", limit=3) == 3
    assert document_count(SENTENCES) == len(SENTENCES) and document_count(iter(SENTENCES)) is None
    assert document_count(jsonl) is None and document_count(jsonl, limit=5) == 5  # would need a pass
    assert document_count(tmp_path / "missing.jsonl") is None  # reading it reports the error


def test_a_library_build_of_a_sized_corpus_reports_read_with_a_total(tiny_bert, tmp_path, capsys, monkeypatch):
    import erstore

    monkeypatch.setenv("ERSTORE_PROGRESS_SECONDS", "0")
    erstore.build(model=str(tiny_bert), layers=(2,), corpus=SENTENCES, store=str(tmp_path / "s"),
                  max_length=64, progress="lines")
    captured = capsys.readouterr()
    n = len(SENTENCES)
    assert "build:" not in captured.out
    err = captured.err.splitlines()
    assert f"build: read started: {n} documents" in err
    assert any(line.startswith(f"build: read {n}/{n} documents (100%)") for line in err), err
    assert any(line.startswith(f"build: compute done: {n} sequences in ") for line in err), err
