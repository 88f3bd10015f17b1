"""Reading at speed: erstore's Loader against raw baselines, measured side by side in one run.

    python benchmarks/bench_read.py --store /tmp/minilm-l3 [--limit 4000] [--batch-size 32]

Builds the store first if it does not exist (real MiniLM layer-3 states of the default corpus,
fp16). Then, on the same stored bytes:
  numpy   reading the raw fp16 states uncompressed from one file in page cache (+ fp32 cast)
  zstd    zstd-1 decompression alone of the same data, in ~768 KiB blocks (the store's chunks)
  loader  erstore Loader, sequential, block-shuffled, and block-shuffled with length buckets;
          padded fp32 batches on CPU
  wait    a consumer computing >= 5 ms per batch (matmuls): mean time it waits for data
GB/s are bytes of *decoded stored activations* (real tokens x d x 2 bytes for fp16), so every row
compares the same work. Appends one JSON line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, record  # noqa: E402

import erstore  # noqa: E402


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "erstore-bench-minilm-l3"))
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--compute-ms", type=float, default=5.0)
    args = ap.parse_args()

    if not (Path(args.store) / "erstore.json").exists():
        print(f"building {args.store} (MiniLM layer 3, {args.limit} documents) ...")
        erstore.build(layers=(3,), store=args.store, limit=args.limit, progress=False)
    store = erstore.open(args.store)
    import torch
    import zstandard

    # The same bytes, decoded once: every stored sequence concatenated in storage order.
    entries = store.read_positions(np.arange(len(store)))
    raw = np.concatenate([e.states for e in entries])
    tokens, d = raw.shape
    nbytes = raw.nbytes
    print(f"store {args.store}: {len(store)} sequences, {tokens} tokens x {d}, {raw.dtype}, "
          f"{nbytes / 1e6:.1f} MB decoded; batch {args.batch_size}, prefetch {args.prefetch}")
    print(machine())

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "raw.bin"
        raw.tofile(path)
        np.fromfile(path, dtype=raw.dtype)  # into page cache
        t_numpy = timed(lambda: np.fromfile(path, dtype=raw.dtype).astype(np.float32))

    chunk_rows = store.codec.rows_per_chunk(d)
    blocks = [raw[i : i + chunk_rows].tobytes() for i in range(0, tokens, chunk_rows)]
    compressed = [zstandard.ZstdCompressor(level=1).compress(b) for b in blocks]
    dctx = zstandard.ZstdDecompressor()
    t_zstd = timed(lambda: [dctx.decompress(c) for c in compressed])

    def run_loader(shuffle: bool, bucket: bool = False) -> tuple[float, int]:
        store_ = erstore.open(args.store)  # cold cache pool (file bytes stay in page cache)
        with store_.loader(batch_size=args.batch_size, shuffle=shuffle, seed=0, prefetch=args.prefetch,
                           bucket_by_length=bucket) as loader:
            t = time.perf_counter()
            n = sum(len(b["keys"]) for b in loader)
            return time.perf_counter() - t, n

    run_loader(False)  # warm-up: page cache, imports
    t_seq = min(run_loader(False)[0] for _ in range(3))
    t_shuf = min(run_loader(True)[0] for _ in range(3))
    t_bucket = min(run_loader(True, bucket=True)[0] for _ in range(3))

    # Consumer that computes: matmuls sized to take >= compute_ms per batch on this machine.
    a = torch.randn(512, 512)
    reps, spent = 1, 0.0
    while spent < args.compute_ms / 1e3:
        reps *= 2
        t = time.perf_counter()
        for _ in range(reps):
            a @ a
        spent = time.perf_counter() - t
    waits, computes = [], []
    with erstore.open(args.store).loader(batch_size=args.batch_size, shuffle=True, seed=1,
                                         prefetch=args.prefetch) as loader:
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waits.append(time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(reps):
                a @ a
            batch["hidden_states"].sum()
            computes.append(time.perf_counter() - t)
    waits_ms = np.array(waits[1:]) * 1e3  # the first batch cannot have been prefetched

    gbs = lambda seconds: nbytes / seconds / 1e9  # noqa: E731
    results = {
        "store": args.store, "sequences": len(store), "tokens": tokens, "hidden_size": d,
        "stored_dtype": str(raw.dtype), "decoded_bytes": nbytes, "batch_size": args.batch_size,
        "prefetch": args.prefetch, "chunk_rows": chunk_rows,
        "numpy_page_cache_gbs": round(gbs(t_numpy), 3), "zstd_only_gbs": round(gbs(t_zstd), 3),
        "loader_sequential_gbs": round(gbs(t_seq), 3), "loader_shuffled_gbs": round(gbs(t_shuf), 3),
        "loader_sequential_seq_s": round(len(store) / t_seq, 1),
        "loader_shuffled_seq_s": round(len(store) / t_shuf, 1),
        "loader_shuffled_bucketed_gbs": round(gbs(t_bucket), 3),
        "loader_shuffled_bucketed_seq_s": round(len(store) / t_bucket, 1),
        "bucketed_over_zstd": round(t_zstd / t_bucket, 3),
        "shuffled_over_zstd": round(t_zstd / t_shuf, 3), "sequential_over_zstd": round(t_zstd / t_seq, 3),
        "consumer_compute_ms_mean": round(float(np.mean(computes)) * 1e3, 2),
        "consumer_wait_ms_mean": round(float(waits_ms.mean()), 3),
        "consumer_wait_ms_p95": round(float(np.percentile(waits_ms, 95)), 3),
        "first_batch_wait_ms": round(waits[0] * 1e3, 2),
    }
    print(f"{'path':<28}{'GB/s':>8}{'seq/s':>10}")
    print(f"{'numpy, page cache (+fp32)':<28}{results['numpy_page_cache_gbs']:>8.3f}")
    print(f"{'zstd-1 decompress only':<28}{results['zstd_only_gbs']:>8.3f}")
    print(f"{'loader sequential':<28}{results['loader_sequential_gbs']:>8.3f}{results['loader_sequential_seq_s']:>10.0f}")
    print(f"{'loader shuffled (blocks)':<28}{results['loader_shuffled_gbs']:>8.3f}{results['loader_shuffled_seq_s']:>10.0f}")
    print(f"{'loader shuffled + buckets':<28}{results['loader_shuffled_bucketed_gbs']:>8.3f}{results['loader_shuffled_bucketed_seq_s']:>10.0f}")
    print(f"shuffled / zstd bound: {results['shuffled_over_zstd']:.2f} (target >= 0.7)")
    print(f"consumer computing {results['consumer_compute_ms_mean']:.1f} ms/batch waits "
          f"{results['consumer_wait_ms_mean']:.3f} ms/batch on average (p95 {results['consumer_wait_ms_p95']:.3f} ms)")
    record("read", results)


if __name__ == "__main__":
    main()
