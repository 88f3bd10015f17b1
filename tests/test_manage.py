"""Version management and catalog: tag, diff, copy, gc, ls, cost (library and CLI)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from click.testing import CliRunner

import erstore
from erstore.cli import main
from erstore.cost import estimate
from erstore.manage import copy, diff, gc, ls, tag, tags
from erstore.verify import verify
from erstore.writer import StoreWriter
from tests.conftest import SENTENCES, write_jsonl


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build_into(model, corpus, store):
    return erstore.build(model=str(model), layers=(2,), corpus=str(corpus), store=str(store), dtype="float32",
                         max_length=64, progress=False, id_field="id")[0]


@pytest.fixture(scope="module")
def built_three(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    rows = [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)]
    rows.append({"id": "long", "text": " ".join(SENTENCES * 6)})
    build_into(tiny_bert, write_jsonl(root / "c1.jsonl", rows), root / "store")
    for n in (2, 3):
        rows = [{"id": f"v{n}-{i}", "text": f"Version {n} sentence: {s}"} for i, s in enumerate(SENTENCES[:3])]
        build_into(tiny_bert, write_jsonl(root / f"c{n}.jsonl", rows), root / "store")
    return root / "store"


@pytest.fixture
def three_versions(built_three, tmp_path):
    """A private copy of a store with three versions (built once per module)."""
    import shutil

    return shutil.copytree(built_three, tmp_path / "store")


def test_tag_open_by_tag_and_diff(three_versions):
    store = three_versions
    assert cli("tag", store, 1, "baseline").exit_code == 0
    assert tag(str(store), "baseline", "also-v1") == 1
    assert tags(str(store)) == {"baseline": 1, "also-v1": 1}
    assert erstore.open(store, version="baseline").version == 1
    result = cli("info", store, "--version", "baseline", "--json")
    assert json.loads(result.output)["version"] == 1
    again = cli("tag", store, 2, "baseline")
    assert again.exit_code == 2 and "already exists" in again.output
    assert cli("tag", store, 2, "baseline", "--force").exit_code == 0
    assert erstore.open(store, version="baseline").version == 2
    assert cli("tag", store, 1, "9lives").exit_code == 2
    assert cli("tag", store, 7, "nope").exit_code == 2
    with pytest.raises(erstore.StoreNotFoundError, match="no version or tag 'missing'"):
        erstore.open(store, version="missing")

    v1, v3 = erstore.open(store, version=1), erstore.open(store)
    d = diff(str(store), 1, 3)
    assert set(d.added) == set(v3) - set(v1) and len(d.added) == 6 and d.removed == []
    assert diff(str(store), 3, 1).removed and set(diff(str(store), 3, 1).removed) == set(d.added)
    out = cli("diff", store, "baseline", 3, "--keys")
    assert out.exit_code == 0 and "+3 added, -0 removed" in out.output and out.output.count("\n+ ") == 3


def test_copy_version_and_key_subset(three_versions, tmp_path):
    src = erstore.open(three_versions, version=2)
    manifest = copy(str(three_versions), str(tmp_path / "v2"), version=2)
    dst = erstore.open(tmp_path / "v2")
    assert manifest.version == 1 and set(dst) == set(src) and dst.recipe == src.recipe
    for a, b in zip(dst.read(list(src)), src.read(list(src))):
        assert a.states.tobytes() == b.states.tobytes() and a.boundary == b.boundary
    assert dst.windows("long") == src.windows("long") and verify(dst).ok
    assert copy(str(three_versions), str(tmp_path / "v2"), version=2) is None  # nothing new

    keys = src.windows("long") + src.windows("d0")
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("\n".join(keys) + "\n")
    result = cli("copy", three_versions, tmp_path / "subset", "--version", 2, "--keys", keys_file)
    assert result.exit_code == 0, result.output
    subset = erstore.open(tmp_path / "subset")
    assert sorted(subset) == sorted(set(keys)) and subset.windows("d0") == src.windows("d0")
    with pytest.raises(erstore.KeyNotFoundError):
        subset.windows("d1")  # its windows were not copied
    bad = tmp_path / "bad.txt"
    bad.write_text("0" * 32 + "\n")
    result = cli("copy", three_versions, tmp_path / "other", "--keys", bad)
    assert result.exit_code == 2 and "not in" in result.output


def dead_build(store, recipe) -> str:
    """A build that flushed rows and died without committing (as after kill -9)."""
    writer = StoreWriter(str(store), recipe, flush_bytes=1)
    rng = np.random.default_rng(0)
    for _ in range(100):  # 40k rows: more than one flush unit (4 chunks) of a d=32 float32 store
        ids = rng.integers(1000, 2000, size=400)
        writer.append(erstore.key_for_ids(ids), rng.standard_normal((400, recipe.hidden_size)), ids)
    writer.close()
    return writer.build_id


def test_gc_dry_run_then_reclaims_dead_builds_only(three_versions):
    store = three_versions
    before = {v: {k: e.states.tobytes() for k, e in zip(s, s.read(list(s)))}
              for v in (1, 2, 3) for s in [erstore.open(store, version=v)]}
    dead = dead_build(store, erstore.open(store).recipe)
    assert (store / "arrays" / dead).exists() and (store / "journal" / dead).exists()

    kept = gc(str(store))  # default grace: the dead build is too recent to be judged dead
    assert kept.deleted_builds == [] and kept.recent_builds == [dead]
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=8)
    dry = gc(str(store), dry_run=True, now=later)
    assert dry.deleted_builds == [dead] and dry.freed_bytes > 0 and (store / "arrays" / dead).exists()
    result = cli("gc", store, "--dry-run", "--grace-hours", 0)
    assert result.exit_code == 0 and f"would delete dead build {dead}" in result.output
    real = gc(str(store), now=later)
    assert real.deleted_builds == [dead] and real.freed_bytes == dry.freed_bytes
    assert not (store / "arrays" / dead).exists() and not (store / "journal" / dead).exists()
    for v, data in before.items():  # every version is intact, bit for bit
        s = erstore.open(store, version=v)
        assert {k: e.states.tobytes() for k, e in zip(s, s.read(list(s)))} == data and verify(s).ok


def test_gc_keep_last_drops_versions_but_keeps_tags_and_newest(three_versions, tiny_bert, tmp_path):
    store = three_versions
    tag(str(store), 1, "paper")
    result = cli("gc", store, "--keep-last", 1, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kept_versions"] == [1, 3] and report["dropped_versions"] == [2]
    with pytest.raises(erstore.StoreNotFoundError):
        erstore.open(store, version=2)
    assert verify(erstore.open(store, version="paper")).ok and verify(erstore.open(store)).ok
    rows = [{"id": "new", "text": "A sentence after garbage collection."}]
    assert build_into(tiny_bert, write_jsonl(tmp_path / "new.jsonl", rows), store).version.version == 4


def test_ls_lists_stores_with_recipe(three_versions, tiny_bert, corpus, tmp_path):
    # three_versions lives at tmp_path/store
    tag(str(three_versions), 3, "latest-good")
    build_into(tiny_bert, corpus, tmp_path / "team" / "other")
    rows = ls(str(tmp_path))
    assert [r["store"] for r in rows] == [str(three_versions), str(tmp_path / "team" / "other")]
    first = rows[0]
    assert first["layer"] == 2 and first["versions"] == [1, 2, 3] and first["tags"] == {"latest-good": 3}
    assert first["codec"]["dtype"] == "float32" and first["bytes"] > 0 and first["model"] == str(tiny_bert)
    text = cli("ls", tmp_path)
    assert text.exit_code == 0 and "latest-good=3" in text.output and "other" in text.output
    assert cli("ls", tmp_path / "missing").exit_code == 2


def test_cost_uses_measured_throughput(three_versions, tmp_path):
    e = estimate(str(three_versions), price_per_hour=3.0, price_per_gb_month=0.02)
    manifests = erstore.open(three_versions).versions()
    done = sum(m.build["computed_tokens"] for m in manifests)
    seconds = sum(m.build["seconds"]["compute"] for m in manifests)
    last = manifests[-1].totals
    assert e.tokens_per_second == pytest.approx(done / seconds)
    assert e.storage_per_month == pytest.approx(last.bytes / 1e9 * 0.02)
    assert e.compute_per_pass == pytest.approx(last.tokens / (done / seconds) / 3600 * 3.0)
    assert e.break_even_passes_per_month == pytest.approx(e.storage_per_month / e.compute_per_pass)
    scaled = estimate(str(three_versions), price_per_hour=3.0, tokens=10 * last.tokens)
    assert scaled.stored_gb == pytest.approx(10 * e.stored_gb)
    out = cli("cost", three_versions, "--price-per-hour", 3)
    assert out.exit_code == 0 and "break-even" in out.output and "measured by builds of versions [1, 2, 3]" in out.output
    copy(str(three_versions), str(tmp_path / "copied"))
    refused = cli("cost", tmp_path / "copied")
    assert refused.exit_code == 2 and "--tokens-per-second" in refused.output
    assert cli("cost", tmp_path / "copied", "--tokens-per-second", 1000).exit_code == 0
