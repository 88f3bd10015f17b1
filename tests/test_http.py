"""Read-only HTTP: a store served by a plain static file server (`python -m http.server`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import erstore
from erstore.verify import verify
from erstore.writer import StoreWriter
from tests.conftest import SENTENCES, write_jsonl
from tests.s3server import free_port, wait_for_http

pytestmark = pytest.mark.slow


@pytest.fixture
def served(tiny_bert, corpus, tmp_path):
    store = tmp_path / "store"
    for c in (corpus, write_jsonl(tmp_path / "more.jsonl", [{"text": f"Served: {s}"} for s in SENTENCES])):
        erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(c), store=str(store), dtype="float32",
                      max_length=64, progress=False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url + "erstore.json", proc)
        yield store, url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_read_store_over_http(served):
    store, url = served
    local, remote = erstore.open(store), erstore.open(url)
    assert remote.version == 2 and remote.recipe == local.recipe and set(remote) == set(local)
    for a, b in zip(remote.read(list(local)), local.read(list(local))):
        assert a.states.tobytes() == b.states.tobytes() and a.token_ids.tolist() == b.token_ids.tolist()
    old = erstore.open(url, version=1)
    assert set(old) == set(erstore.open(store, version=1))
    assert verify(remote).ok and verify(old).ok


def test_http_is_read_only_and_errors_are_clear(served, tiny_bert):
    store, url = served
    recipe = erstore.open(store).recipe
    with pytest.raises(erstore.StorePermissionError, match="read-only"):
        StoreWriter(url, recipe)
    with pytest.raises(erstore.StoreNotFoundError, match="not an erstore store"):
        erstore.open(url + "nothing-here/")
    with pytest.raises(erstore.StoreUnreachableError):
        erstore.open(f"http://127.0.0.1:{free_port()}/")
