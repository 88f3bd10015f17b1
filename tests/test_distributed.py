"""Distributed build with torchrun (2 CPU processes, gloo): one version, or none if a rank fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import erstore
from erstore.builder import BuildConfig, build
from erstore.verify import verify
from tests.conftest import SENTENCES, write_jsonl

pytestmark = pytest.mark.slow

FAIL_ON_RANK_1 = """
import os
from erstore import distributed
if os.environ["RANK"] == "1":
    def fail(self, **kwargs):
        self._flush(final=True)  # its rows are durable and journaled, then the rank dies
        raise RuntimeError("injected failure on rank 1")
    distributed.RankWriter.commit = fail
distributed.main()
"""


def torchrun(target, *args, **env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target,
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def options(model, corpus, store):
    return ["--model", model, "--corpus", corpus, "--store", store, "--layer", 2, "--max-length", 64,
            "--dtype", "float32", "--batch-size", 1, "--id-field", "id", "--quiet"]


@pytest.fixture
def big(tmp_path) -> Path:
    rows = [{"id": f"d{i}-{j}", "text": f"{s} Variant {j}."} for j in range(3) for i, s in enumerate(SENTENCES)]
    # First: ranks read byte ranges of one JSONL file, and a line belongs to the range it starts in;
    # last, this one line (most of the file's bytes) would put every line start in rank 0's range.
    rows.insert(0, {"id": "long", "text": " ".join(SENTENCES * 6)})
    return write_jsonl(tmp_path / "big.jsonl", rows)


def test_failed_rank_leaves_no_version_then_two_ranks_commit_one(tiny_bert, big, tmp_path):
    store = tmp_path / "dist"
    script = tmp_path / "fail_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    proc = torchrun([str(script)], *options(tiny_bert, big, store))
    assert proc.returncode != 0 and "injected failure on rank 1" in proc.stdout + proc.stderr
    assert not list(store.glob("versions/*.json"))
    with pytest.raises(erstore.StoreNotFoundError):
        erstore.open(store, version=1)
    assert list(store.glob("journal/*/*.idx"))  # durable rows of the failed run, kept to resume

    proc = torchrun(["-m", "erstore.distributed"], *options(tiny_bert, big, store)[:-1], ERSTORE_PROGRESS="lines")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):  # each rank reports its own phases, named by rank
        assert f"build rank {rank}/2: compute done: " in proc.stderr, proc.stderr
    [single] = build(BuildConfig(model=str(tiny_bert), corpus=str(big), store=str(tmp_path / "single"),
                                 layers=(2,), dtype="float32", max_length=64, batch_size=1, id_field="id",
                                 progress=False))
    dist, ref = erstore.open(store), erstore.open(tmp_path / "single")
    assert [m.version for m in dist.versions()] == [1]
    assert set(dist) == set(ref) and len(dist) == single.version.totals.sequences
    for x, y in zip(dist.read(list(ref)), ref.read(list(ref))):
        # torchrun runs each rank with OMP_NUM_THREADS=1: GEMM sums in another order (~1e-7).
        np.testing.assert_allclose(x.states, y.states, rtol=1e-5, atol=1e-6)
        assert x.token_ids.tolist() == y.token_ids.tolist()
    assert dist.windows("long") == ref.windows("long") and verify(dist).ok
    assert len(dist.index.arrays) >= 2  # one array per rank (plus the failed run's adopted ones)
    b = dist.manifest.build
    assert b["ranks"] == 2 and len(b["rank_builds"]) == 2
    # Input sharding: each rank read and tokenized only its share of the documents.
    shares = [r["documents"] for r in b["rank_builds"]]
    assert sum(shares) == single.documents and max(shares) < single.documents
    assert b["computed"] < single.computed  # the failed run's durable rows were adopted, not recomputed
    assert not list(store.glob("journal/*/*.idx"))
