"""Build cost, bytes per value and scale of the core store (issue: the core).

1. Build time / bare forward of layers 0..k over the same corpus (same tokenizer, windows and
   equal-length batches; model and corpus loading excluded from both). Target <= 1.10 on CPU.
2. Bytes per stored value for float32 / float16 / bfloat16, beside the paper's figures
   (512 x 768 padded: 1.6 MB fp32, 0.8 MB fp16 = 4 and 2 bytes per value, padding included).
3. Scale: open time, random get latency and index bytes for synthetic stores of 10k and 1M
   sequences.

Run: HF_HUB_OFFLINE=1 python benchmarks/bench_build.py [--limit 2000] [--scale 1000000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record  # noqa: E402

import erstore  # noqa: E402
from erstore.builder import BuildConfig, build, length_batches  # noqa: E402
from erstore.codecs import LosslessCodec  # noqa: E402
from erstore.corpus import default_corpus  # noqa: E402
from erstore.keys import key_for_ids, window_key  # noqa: E402
from erstore.manifest import Recipe  # noqa: E402
from erstore.model import LayerExtractor  # noqa: E402
from erstore.tokenize import DEFAULT_MODEL, Windower, load_tokenizer  # noqa: E402
from erstore.writer import StoreWriter  # noqa: E402


def bare_forward(docs, layer: int, batch_size: int) -> float:
    """Tokenize + forward layers 0..k-1 with the build's batching, storing nothing."""
    import torch

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    extractor = LayerExtractor(DEFAULT_MODEL)
    windower = Windower(tokenizer, 512, 128)
    t0 = time.perf_counter()
    todo = {}
    for start in range(0, len(docs), 512):
        for windows in windower.windows_batch([d.text for d in docs[start : start + 512]]):
            for ids, b in windows:
                todo.setdefault(window_key(ids, b), (window_key(ids, b), ids, b, [layer]))
    for batch in length_batches(list(todo.values()), batch_size):
        ids = torch.tensor([t[1] for t in batch])
        out = extractor(ids, torch.ones_like(ids), torch.zeros_like(ids), [layer])
        out[layer].float().numpy()
    return time.perf_counter() - t0


def build_cost(limit: int, repeats: int, tmp: Path) -> dict:
    docs = default_corpus(limit)
    rows = []
    for r in range(repeats):
        bare = bare_forward(docs, 3, 32)
        for dtype in ("float32", "float16", "bfloat16"):
            store = tmp / f"build-{dtype}-{r}"
            [res] = build(BuildConfig(limit=limit, store=str(store), dtype=dtype, progress=False))
            p = res.phases
            work = p["tokenize"] + p["compute"] + p["commit"]
            v = res.version
            rows.append({"dtype": dtype, "repeat": r, "bare_s": round(bare, 2), "build_s": round(work, 2),
                         "ratio": round(work / bare, 3), "phases": p, "tokens": v.totals.tokens,
                         "bytes": v.totals.bytes,
                         "bytes_per_value": round(v.totals.bytes / (v.totals.tokens * 384), 3)})
            shutil.rmtree(store)
    return {"limit": limit, "runs": rows}


def scale(n: int, tmp: Path, d: int = 16) -> dict:
    rng = np.random.default_rng(0)
    recipe = Recipe(model_fingerprint="synthetic", layer=1, tokenizer_fingerprint="synthetic", max_length=8,
                    stride=0, codec=LosslessCodec("float16").to_dict(), hidden_size=d, num_layers=2)
    path = tmp / f"scale-{n}"
    t0 = time.perf_counter()
    lengths = rng.integers(1, 8, size=n)
    states = rng.standard_normal((int(lengths.sum()), d)).astype(np.float32)
    keys = []
    with StoreWriter(path, recipe) as w:
        row = 0
        for i, length in enumerate(lengths.tolist()):
            ids = [i, *rng.integers(0, 30000, size=length - 1).tolist()]  # unique first id
            key = key_for_ids(ids)
            w.append(key, states[row : row + length], np.asarray(ids))
            keys.append(key)
            row += length
        w.commit()
    write_s = time.perf_counter() - t0
    opens = []
    for _ in range(3):
        t0 = time.perf_counter()
        store = erstore.open(path)
        opens.append(time.perf_counter() - t0)
    sample = [keys[i] for i in rng.integers(0, n, size=2000)]
    for k in sample[:50]:
        store.get(k)  # open array handles
    lat = []
    for k in sample[50:]:
        t0 = time.perf_counter()
        store.get(k)
        lat.append(time.perf_counter() - t0)
    index_bytes = sum(p.stat().st_size for p in (path / "index").glob("*.idx"))
    memory = store.index.records.nbytes + store.index._hi.nbytes + store.index._lo.nbytes + store.index._sorted.nbytes
    return {"sequences": n, "write_s": round(write_s, 1), "open_s": round(min(opens), 3),
            "get_median_ms": round(statistics.median(lat) * 1e3, 3),
            "get_p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3),
            "index_bytes_per_sequence_disk": round(index_bytes / n, 1),
            "index_bytes_per_sequence_memory": round(memory / n, 1)}


def print_cost(cost: dict, limit: int) -> None:
    print(f"\n== build / bare forward (MiniLM, layer 3, {limit} stdlib paragraphs) ==")
    print(f"{'dtype':9} {'rep':>3} {'bare s':>7} {'build s':>8} {'ratio':>6} {'bytes/value':>11}")
    for r in cost["runs"]:
        print(f"{r['dtype']:9} {r['repeat']:>3} {r['bare_s']:>7} {r['build_s']:>8} {r['ratio']:>6} "
              f"{r['bytes_per_value']:>11}")
    print("paper (padded, uncompressed): fp32 4.0 bytes/value (1.6 MB per 512x768), fp16 2.0 (0.8 MB)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=2000, help="documents of the default corpus")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scale", type=int, default=1_000_000)
    ap.add_argument("--only", choices=["build", "scale"], default=None)
    args = ap.parse_args()
    print(machine())
    cost, scales = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "scale":
            cost = build_cost(args.limit, args.repeats, Path(tmp))
            print_cost(cost, args.limit)
        if args.only != "build":
            scales = [scale(n, Path(tmp)) for n in (10_000, args.scale)]
            print("\n== scale (synthetic fp16 states, d=16, 1-7 tokens per sequence) ==")
            for s in scales:
                print(s)
    record("build", {"build_cost": cost, "scale": scales})


if __name__ == "__main__":
    main()
