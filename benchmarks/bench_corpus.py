"""Corpus reading: documents/s of `erstore.corpus.iter_corpus` per format, next to a bare baseline.

Writes one synthetic corpus (N documents of ~120 characters plus an id) in every format, then
per format, in one run: iter_corpus over it (all fields checked, Documents made), the bare
library read of the same column (`json.loads` per line; pyarrow `to_pylist`), the rank-0-of-4
shard, and the peak RSS growth while streaming (reset through /proc/self/clear_refs) to show the
reader does not hold the corpus.

    python benchmarks/bench_corpus.py --docs 200000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import zstandard

from benchmarks.common import record
from erstore.corpus import iter_corpus


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def write_all(folder: Path, n: int) -> dict[str, Path]:
    rows = [{"id": f"doc-{i}", "text": f"Document {i} says something about embedding recycling and the "
             f"reuse of hidden states across {i % 97} training runs of reduced models."} for i in range(n)]
    table = pa.Table.from_pylist(rows)
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    paths = {"jsonl": folder / "c.jsonl", "jsonl.gz": folder / "c.jsonl.gz", "jsonl.zst": folder / "c.jsonl.zst",
             "text": folder / "c.txt", "csv": folder / "c.csv", "parquet": folder / "c.parquet",
             "arrow": folder / "c.arrow"}
    paths["jsonl"].write_bytes(lines)
    paths["jsonl.gz"].write_bytes(gzip.compress(lines, 6))
    paths["jsonl.zst"].write_bytes(zstandard.compress(lines, 3))
    paths["text"].write_text("".join(r["text"] + "\n" for r in rows))
    pcsv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"], row_group_size=16384)
    with pa.ipc.new_file(paths["arrow"], table.schema) as w:
        for b in table.to_batches(max_chunksize=8192):
            w.write_batch(b)
    return paths


def baseline(kind: str, path: Path) -> int:
    """The bare library read of the text column: what any reader must at least pay."""
    if kind.startswith("jsonl"):
        opener = {"jsonl": open, "jsonl.gz": gzip.open}.get(kind)
        if opener is None:
            fh = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))  # noqa: SIM115
        else:
            fh = opener(path, "rb")
        with fh:
            import io

            return sum(1 for line in io.BufferedReader(fh) if json.loads(line)["text"])  # type: ignore[arg-type]
    if kind == "text":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.decode().strip())
    if kind == "csv":
        return len(pcsv.read_csv(path).column("text").to_pylist())
    if kind == "parquet":
        return len(pq.read_table(path, columns=["text"]).column("text").to_pylist())
    with pa.ipc.open_file(pa.memory_map(str(path))) as r:
        return len(r.read_all().column("text").to_pylist())


def timed(fn, *args, **kwargs) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args, **kwargs)
    return time.perf_counter() - t, n


def count(path: Path, **options) -> int:
    return sum(1 for _ in iter_corpus(path, **options))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200_000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_all(Path(tmp), args.docs)
        print(f"{'format':10} {'MB':>7} {'iter_corpus docs/s':>19} {'baseline docs/s':>16} {'ratio':>6} "
              f"{'shard 0/4 s':>11} {'peak RSS +MB':>12}")
        for kind, path in paths.items():
            id_field = None if kind == "text" else "id"
            base_s, base_n = timed(baseline, kind, path)
            reset_peak()
            before = peak_rss_mb()
            ours_s, ours_n = timed(count, path, id_field=id_field)
            grown = peak_rss_mb() - before
            shard_s, _ = timed(count, path, id_field=id_field, shard=(0, 4))
            assert ours_n == base_n == args.docs, (kind, ours_n, base_n)
            row = {"mb": round(path.stat().st_size / 1e6, 1), "docs_per_s": round(ours_n / ours_s),
                   "baseline_docs_per_s": round(base_n / base_s), "ratio_to_baseline": round(base_s / ours_s, 2),
                   "seconds": round(ours_s, 3), "shard0of4_seconds": round(shard_s, 3),
                   "peak_rss_growth_mb": round(grown, 1)}
            results[kind] = row
            print(f"{kind:10} {row['mb']:>7} {row['docs_per_s']:>19,} {row['baseline_docs_per_s']:>16,} "
                  f"{row['ratio_to_baseline']:>6} {row['shard0of4_seconds']:>11} {row['peak_rss_growth_mb']:>12}")
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}")
    record("corpus", {"docs": args.docs, "load_average": round(load, 2), "formats": results})


if __name__ == "__main__":
    main()
