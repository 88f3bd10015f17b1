"""Export: throughput and peak memory of `erstore export` per format against the store's size.

Writes a synthetic float16 store (random states, no model: export does not care where states
came from), then exports it to Parquet, safetensors and npz, each in a fresh subprocess, and
reports MB/s of decoded states and the peak RSS of the exporting process next to the RSS of the
same process after just opening the store: the difference is what export holds. Two store sizes
in one run: if export streams, what it holds does not grow with the store (safetensors holds one
shard, up to 256 MB, so it grows until the store exceeds a shard).

    python benchmarks/bench_export.py --mb 200 400
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import record
from erstore.codecs import LosslessCodec
from erstore.keys import key_for_ids
from erstore.manifest import Recipe
from erstore.writer import StoreWriter

CHILD = r"""
import json, sys, time
from pathlib import Path
import erstore
from erstore.export import CACHE_BYTES, export

def hwm():  # peak RSS of this process image (ru_maxrss would carry the parent's peak across exec)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

store = erstore.open(sys.argv[1], cache_bytes=CACHE_BYTES)  # as `erstore export` opens it
opened = hwm()
t = time.perf_counter()
r = export(store, sys.argv[2], format=sys.argv[3])
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "opened_rss_mb": opened, "peak_rss_mb": hwm(), "sequences": r.sequences}))
"""


def make_store(path: Path, mb: int, d: int = 384) -> tuple[int, int]:
    recipe = Recipe(model_fingerprint="f" * 32, layer=3, tokenizer_fingerprint="t" * 32, max_length=128,
                    stride=32, codec=LosslessCodec("float16").to_dict(), hidden_size=d, num_layers=6)
    rng = np.random.default_rng(0)
    rows = mb * 1_000_000 // (2 * d)
    n = 0
    with StoreWriter(str(path), recipe) as w:
        written = 0
        while written < rows:
            length = int(rng.integers(16, 128))
            ids = rng.integers(0, 30000, size=length)
            w.append(key_for_ids(ids), rng.standard_normal((length, d)).astype(np.float16), ids)
            written += length
            n += 1
        w.commit()
    return n, written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, nargs="+", default=[200, 400], help="float16 MB per store")
    args = parser.parse_args()
    for mb in args.mb:
        run(mb)


def run(mb: int) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        sequences, rows = make_store(store, mb)
        decoded_mb = rows * 384 * 2 / 1e6
        print(f"store: {sequences} sequences, {rows} rows, {decoded_mb:.0f} MB of float16 states")
        print(f"{'format':12} {'s':>7} {'MB/s':>7} {'RSS open MB':>12} {'peak RSS MB':>12} {'held MB':>8}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for fmt in ("parquet", "safetensors", "npz"):
            out = Path(tmp) / f"out.{fmt}"
            proc = subprocess.run([sys.executable, "-c", CHILD, str(store), str(out), fmt], env=env,
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            assert r["sequences"] == sequences
            row = {"seconds": round(r["seconds"], 2), "mb_per_s": round(decoded_mb / r["seconds"], 1),
                   "opened_rss_mb": round(r["opened_rss_mb"]), "peak_rss_mb": round(r["peak_rss_mb"]),
                   "held_mb": round(r["peak_rss_mb"] - r["opened_rss_mb"])}
            results[fmt] = row
            print(f"{fmt:12} {row['seconds']:>7} {row['mb_per_s']:>7} {row['opened_rss_mb']:>12} "
                  f"{row['peak_rss_mb']:>12} {row['held_mb']:>8}")
            if out.is_dir():
                import shutil

                shutil.rmtree(out)
            else:
                out.unlink()
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}")
    record("export", {"store_mb": round(decoded_mb), "sequences": sequences, "load_average": round(load, 2),
                      "formats": results})


if __name__ == "__main__":
    main()
