"""Object storage for real: builds, reads, verify and the dataset against a moto_server over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

import erstore
from erstore.cli import main
from erstore.location import Location, _s3_sizes
from erstore.verify import verify
from tests.conftest import SENTENCES, write_jsonl
from tests.s3server import create_bucket, free_port

pytestmark = pytest.mark.slow


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build_args(model, corpus, store, *extra):
    return ["build", "--model", model, "--corpus", corpus, "--store", store, "--layer", 2, "--max-length", 64,
            "--dtype", "float32", "--quiet", *extra]


def same_entries(a, b, keys):
    for x, y in zip(a.read(keys), b.read(keys)):
        assert x.states.tobytes() == y.states.tobytes() and x.token_ids.tolist() == y.token_ids.tolist()


def test_build_read_versions_verify(tiny_bert, corpus, tmp_path, s3_server, s3_url):
    result = cli(*build_args(tiny_bert, corpus, s3_url, "--endpoint", s3_server))
    assert result.exit_code == 0, result.output
    more = write_jsonl(tmp_path / "more.jsonl", [{"text": f"{s} Again, differently."} for s in SENTENCES])
    result = cli(*build_args(tiny_bert, more, s3_url, "--endpoint", s3_server))
    assert result.exit_code == 0, result.output

    local = tmp_path / "local"
    for c in (corpus, more):
        assert cli(*build_args(tiny_bert, c, local)).exit_code == 0
    remote, reference = erstore.open(s3_url, endpoint=s3_server), erstore.open(local)
    assert remote.version == 2 and set(remote) == set(reference)
    same_entries(remote, reference, list(reference))
    v1 = erstore.open(s3_url, version=1, endpoint=s3_server)
    assert set(v1) == set(erstore.open(local, version=1)) and len(v1) < len(remote)
    assert verify(remote).ok and verify(v1).ok
    report = cli("verify", s3_url, "--version", 1, "--endpoint", s3_server, "--json")
    assert report.exit_code == 0 and '"ok": true' in report.output
    info = cli("info", s3_url, "--endpoint", s3_server)
    assert info.exit_code == 0 and "version    2 of 2" in info.output, info.output

    # The manifest's byte count comes from a listing with sizes, equal to reading every object.
    location = Location.open(s3_url, endpoint=s3_server)
    array = remote.index.arrays[0]
    keys = location.list(f"arrays/{array}/")
    by_reading = sum(len(v) for v in location.read_many(keys))
    assert _s3_sizes(location.spec, location.spec["path"] + f"arrays/{array}/") == by_reading > 0


def test_endpoint_from_environment_and_dataset(tiny_bert, corpus, s3_server, s3_url, monkeypatch):
    torchdata = pytest.importorskip("erstore.torchdata")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    [result] = erstore.build(model=str(tiny_bert), layers=(2,), corpus=str(corpus), store=s3_url,
                             dtype="float32", max_length=64, progress=False)
    store = erstore.open(s3_url)
    dataset = torchdata.StoreDataset(s3_url)
    assert len(dataset) == len(store) == result.version.totals.sequences
    for i, key in enumerate(store):
        item = dataset[i]
        assert item["key"] == key
        assert item["hidden_states"].numpy().tobytes() == store.get(key).tobytes()


def test_write_if_absent_is_conditional_on_s3(s3_server, s3_url):
    """Racing writers of one key: exactly one wins, and its value is what is stored."""
    writers = [Location.open(s3_url, endpoint=s3_server) for _ in range(4)]
    writers[0].check_conditional_writes()
    for i in range(40):
        key, wins = f"race/{i}", {}
        barrier = threading.Barrier(len(writers))

        def attempt(j, loc=None, key=key, wins=wins, barrier=barrier):
            barrier.wait()
            wins[j] = writers[j].write_if_absent(key, f"writer {j}".encode())

        threads = [threading.Thread(target=attempt, args=(j,)) for j in range(len(writers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [j for j, won in wins.items() if won]
        assert len(winners) == 1, f"{key}: winners {winners}"
        assert writers[0].read(key) == f"writer {winners[0]}".encode()


def test_missing_bucket_fails_clearly(tiny_bert, corpus, s3_server):
    url = "s3://no-such-bucket-here/store"
    with pytest.raises(erstore.StoreNotFoundError, match="bucket 'no-such-bucket-here'.*does not exist"):
        erstore.open(url, endpoint=s3_server)
    result = cli(*build_args(tiny_bert, corpus, url, "--endpoint", s3_server))
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


def test_unreachable_endpoint_fails_clearly(s3_url):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(erstore.StoreUnreachableError, match="cannot reach the endpoint"):
        erstore.open(s3_url, endpoint=endpoint)
    result = cli("info", s3_url, "--endpoint", endpoint)
    assert result.exit_code == 2 and "cannot reach the endpoint" in result.output


def test_missing_credentials_fail_clearly(tiny_bert, corpus, s3_server, s3_url, tmp_path, monkeypatch):
    assert cli(*build_args(tiny_bert, corpus, s3_url, "--endpoint", s3_server)).exit_code == 0
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(erstore.StorePermissionError, match="no AWS credentials"):
        erstore.open(s3_url, endpoint=s3_server, credentials="environment")
    # The CLI with no credentials anywhere (no variables, no ~/.aws, no instance metadata).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "erstore.cli", "info", s3_url, "--endpoint", s3_server],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "credentials" in last, proc.stderr


def test_copy_local_to_s3_keeps_keys_and_recipe(tiny_bert, corpus, tmp_path, s3_server, s3_url):
    local = tmp_path / "local"
    assert cli(*build_args(tiny_bert, corpus, local, "--id-field", "id")).exit_code == 0
    result = cli("copy", local, s3_url, "--dst-endpoint", s3_server)
    assert result.exit_code == 0, result.output
    src, dst = erstore.open(local), erstore.open(s3_url, endpoint=s3_server)
    assert dst.recipe == src.recipe and set(dst) == set(src)
    same_entries(dst, src, list(src))
    assert dst.windows("long") == src.windows("long") and verify(dst).ok
    assert dst.manifest.build["copied_from"] == str(local)
    listing = cli("ls", s3_url.rsplit("/", 1)[0], "--endpoint", s3_server, "--json")
    assert listing.exit_code == 0 and s3_url in listing.output


def test_second_bucket_and_region_flag(tiny_bert, corpus, s3_server):
    create_bucket(s3_server, "erstore-region-test")
    url = "s3://erstore-region-test/a/b"
    result = cli(*build_args(tiny_bert, corpus, url, "--endpoint", s3_server, "--region", "eu-west-1"))
    assert result.exit_code == 0, result.output
    assert len(erstore.open(url, endpoint=s3_server, region="eu-west-1")) > 0
