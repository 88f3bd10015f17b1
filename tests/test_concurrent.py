"""Two real `erstore build` processes append different corpora to one store at the same time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import erstore
from erstore.builder import BuildConfig, build
from erstore.verify import verify
from tests.conftest import SENTENCES, write_jsonl

pytestmark = pytest.mark.slow


def corpora(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"{s} (team a)"} for s in SENTENCES])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"Team b says: {s.lower()}"} for s in SENTENCES])
    return a, b


# One process per team; each runs `erstore build` (the CLI's code path) for every store in turn,
# so both processes race on each store while paying the torch/transformers start-up only once.
TEAM = """
import sys
from erstore.cli import main
model, corpus, *stores = sys.argv[1:]
for store in stores:
    main(["build", "--model", model, "--corpus", corpus, "--store", store, "--layer", "2",
          "--max-length", "64", "--dtype", "float32", "--batch-size", "1", "--quiet"], standalone_mode=False)
"""


def run_both(model, corpora_, stores, env_extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    procs = [subprocess.Popen([sys.executable, "-c", TEAM, str(model), str(c), *map(str, stores)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in corpora_]
    return [(p.wait(timeout=300), *p.communicate()) for p in procs]


def reference(model, corpus, store):
    build(BuildConfig(model=str(model), corpus=str(corpus), store=str(store), layers=(2,), dtype="float32",
                      max_length=64, batch_size=1, progress=False))
    return erstore.open(store)


def test_concurrent_builds_append_both_corpora(tiny_bert, tmp_path, s3_server, s3_url):
    """Repeated three times (two local stores and one on S3): both builds commit, nothing is lost."""
    a, b = corpora(tmp_path)
    refs = [reference(tiny_bert, c, tmp_path / f"ref-{c.stem}") for c in (a, b)]
    stores = [tmp_path / "shared-1", tmp_path / "shared-2", s3_url]
    results = run_both(tiny_bert, (a, b), stores, {"AWS_ENDPOINT_URL": s3_server})
    assert all(rc == 0 for rc, _, _ in results), results
    union = set().union(*(set(r) for r in refs))
    for store in stores:
        final = erstore.open(store, endpoint=s3_server) if str(store).startswith("s3://") else erstore.open(store)
        assert final.version == 2 and verify(final).ok
        assert set(final) == union and final.manifest.totals.sequences == len(final)
        for ref in refs:
            for x, y in zip(final.read(list(ref)), ref.read(list(ref))):
                assert x.states.tobytes() == y.states.tobytes() and x.token_ids.tolist() == y.token_ids.tolist()
