"""Crash safety with real processes: kill -9 / Ctrl-C mid-build, then resume; verify catches damage."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import erstore
from erstore.builder import BuildConfig, build
from erstore.cli import main
from erstore.manifest import decode_index
from erstore.verify import verify
from tests.conftest import SENTENCES, TOKENIZER_FILES, minilm_path, write_jsonl

pytestmark = pytest.mark.slow

BUILD_SCRIPT = """
import sys
from erstore.builder import BuildConfig, build
build(BuildConfig(model=sys.argv[1], corpus=sys.argv[2], store=sys.argv[3], layers=(2,), dtype="float32",
                  max_length=64, batch_size=2, progress=False, store_options={"flush_bytes": 4096}))
"""


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory) -> Path:
    """A tiny BERT with d=256, so 16 KiB flushes fill whole chunks often (many journal files)."""
    import shutil

    import transformers

    folder = tmp_path_factory.mktemp("models") / "wide-bert"
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=512)
    transformers.BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)
    return folder


def big_corpus(path: Path, n: int = 1500) -> Path:
    rng = random.Random(0)
    words = " ".join(SENTENCES).lower().replace(".", "").split()
    return write_jsonl(path, [{"text": " ".join(rng.choices(words, k=rng.randint(5, 40)))} for _ in range(n)])


def config(model, corpus, store, **kw):
    # batch_size as in BUILD_SCRIPT: CPU GEMM kernels may round differently for other batch shapes
    return BuildConfig(model=str(model), corpus=str(corpus), store=str(store), layers=(2,), dtype="float32",
                       max_length=64, batch_size=2, progress=False, **kw)


# Flushes by bytes never happen here (1 GiB); only the time-based flush (every 0.5 s) journals.
TIMED_SCRIPT = BUILD_SCRIPT.replace('{"flush_bytes": 4096}', '{"flush_bytes": 1 << 30, "journal_seconds": 0.5}')


def start_and_interrupt(model, corpus, store, sig, *, script=BUILD_SCRIPT, journals=3, pattern="*.idx") -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(model), str(corpus), str(store)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = store / "journal"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        # A resume point is its .docs file and then its .idx file: wait for both.
        if journal.exists() and sum(1 for p in journal.rglob(pattern) if p.with_suffix(".idx").exists()) >= journals:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    proc.send_signal(sig)
    proc.communicate(timeout=120)  # also closes the pipes
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_build_keeps_versions_and_resumes(wide_bert, corpus, tmp_path, sig):
    store = tmp_path / "s"
    [first] = build(config(wide_bert, corpus, store))
    before = erstore.open(store)
    snapshot = {k: before.get(k).tobytes() for k in before}

    big = big_corpus(tmp_path / "big.jsonl")
    rc = start_and_interrupt(wide_bert, big, store, sig)
    assert rc != 0
    after = erstore.open(store)  # the committed version is intact and still the newest
    assert after.version == 1 and {k: after.get(k).tobytes() for k in after} == snapshot
    assert verify(after).ok

    [resumed] = build(config(wide_bert, big, store))
    assert resumed.resumed > 0, "journaled rows of the killed build were recomputed"
    assert resumed.computed < resumed.windows
    final = erstore.open(store)
    assert final.version == 2

    [clean] = build(config(wide_bert, big, tmp_path / "clean"))
    reference = erstore.open(tmp_path / "clean")
    keys = list(reference)
    assert all(k in final for k in keys)
    for a, b in zip(final.read(keys), reference.read(keys)):
        assert a.states.tobytes() == b.states.tobytes() and a.token_ids.tolist() == b.token_ids.tolist()
    overlap = sum(k in before for k in keys)
    assert final.manifest.totals.sequences == len(final)
    assert len(final) == first.version.totals.sequences + clean.version.added.sequences - overlap
    assert not any((store / "journal").rglob("*.idx"))  # resume aid cleaned up after commit


def test_kill_mid_compute_after_a_timed_journal_resumes_part_and_computes_the_rest(wide_bert, tmp_path):
    """Journals by time, not only by bytes: a build killed after its first timed flush loses
    only the work since, and the resumed build equals an uninterrupted one bit for bit."""
    store = tmp_path / "s"
    # Killed at the first timed journal, of a corpus large enough that compute is still running
    # then on a quiet machine too (with 1,200 documents and 2 journals it had sometimes finished).
    big = big_corpus(tmp_path / "big.jsonl", n=4000)
    rc = start_and_interrupt(wide_bert, big, store, signal.SIGKILL, script=TIMED_SCRIPT, journals=1)
    assert rc != 0
    assert not list(store.glob("versions/*.json"))  # nothing committed by the killed build
    durable = sum(len(decode_index(p.read_bytes(), str(p))[0]) for p in (store / "journal").rglob("*.idx"))
    assert durable > 0

    [resumed] = build(config(wide_bert, big, store))
    assert resumed.resumed == durable > 0, "journaled rows of the killed build were recomputed"
    assert 0 < resumed.computed < resumed.windows
    [clean] = build(config(wide_bert, big, tmp_path / "clean"))
    final, reference = erstore.open(store), erstore.open(tmp_path / "clean")
    keys = list(reference)
    assert set(final) == set(keys) and resumed.computed + resumed.resumed == clean.computed
    for a, b in zip(final.read(keys), reference.read(keys)):
        assert a.states.tobytes() == b.states.tobytes() and a.token_ids.tolist() == b.token_ids.tolist()
    assert verify(final).ok


def test_kill_after_a_resume_point_skips_its_documents_without_tokenizing(wide_bert, tmp_path):
    """A journal that records how far the input is durable lets the rerun skip those documents:
    it reads them (checking their digest) but tokenizes only the rest, and still equals an
    uninterrupted build bit for bit, document map included."""
    store = tmp_path / "s"
    big = big_corpus(tmp_path / "big.jsonl", n=3000)  # a resume point comes after the 2nd buffer
    rc = start_and_interrupt(wide_bert, big, store, signal.SIGKILL, journals=1, pattern="*.docs")
    assert rc != 0
    [resumed] = build(config(wide_bert, big, store))
    info = resumed.version.build
    assert 0 < info["skipped_documents"] < 3000, "the durable documents were tokenized again"
    assert info["tokenized_documents"] == 3000 - info["skipped_documents"] and resumed.documents == 3000
    [clean] = build(config(wide_bert, big, tmp_path / "clean"))
    final, reference = erstore.open(store), erstore.open(tmp_path / "clean")
    keys = list(reference)
    assert set(final) == set(keys) and resumed.windows == clean.windows
    for a, b in zip(final.read(keys), reference.read(keys)):
        assert a.states.tobytes() == b.states.tobytes() and a.token_ids.tolist() == b.token_ids.tolist()
    assert final.documents() == reference.documents()
    assert verify(final).ok


def test_verify_names_corrupt_keys_and_exits_nonzero(tiny_bert, corpus, tmp_path):
    from click.testing import CliRunner

    store = tmp_path / "s"
    build(config(tiny_bert, corpus, store))
    chunks = sorted(p for p in (store / "arrays").rglob("states/c/*/*") if p.is_file())
    victim = chunks[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte inside a compressed chunk
    victim.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(store), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert not report["ok"] and report["corrupt"]
    assert all(len(c["key"]) == 32 and c["problem"] for c in report["corrupt"])
    assert report["checked"] == len(erstore.open(store))
