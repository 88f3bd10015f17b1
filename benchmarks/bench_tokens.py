"""The token-level feed (`store.tokens`) against every other way to get the same token rows.

    python benchmarks/bench_tokens.py --store /tmp/minilm-l3 [--limit 4000] [--batch-size 4096]

Builds the store first if it does not exist (real MiniLM layer-3 states of the default corpus,
fp16). Then, in one run, on the same stored tokens:
  zstd        zstd decompression alone of the store's own chunk files (read into memory first),
              on one thread: the bound a reader that decodes each chunk once works against
  loader      the sequence Loader, sequential, batch 32 (padded fp32 batches, as bench_read.py)
  tokens      store.tokens(batch_size=N), shuffled and sequential, fp16 and fp32 batches
  random      N uniformly random tokens per batch through store.read_positions (every sequence
              holding one is read and the row picked): the per-token read a feed replaces
  recompute   MiniLM stopped at layer k (erstore.model.LayerExtractor, as the build runs it) on
              the stored windows' token ids, length-sorted padded batches of 32, on this machine's
              CPU (and on CUDA when present, fp32 and bf16): what a feed must beat to be worth
              storing
GB/s are bytes of decoded stored activations (tokens x d x 2 bytes for fp16) delivered; tokens/s
count delivered token rows. Each timing is the best of --repeat runs; the bound, the Loader and the shuffled feed alternate
round by round, and each round's feed / bound ratio is reported too. Appends one JSON line to
benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, record

import erstore


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def zstd_bound(store: erstore.Store, repeat: int = 3) -> float:
    """Seconds to zstd-decompress every chunk file of the states arrays on one thread."""
    import zstandard

    root = Path(store.location.spec["path"])
    blobs = [p.read_bytes() for a in store.index.arrays for p in (root / "arrays" / a / "states" / "c").rglob("*")
             if p.is_file()]
    dctx = zstandard.ZstdDecompressor()
    return best(lambda: [dctx.decompress(b) for b in blobs], repeat)


def feed_times(path: str, repeat: int, **options) -> tuple[float, float, int]:
    """Best seconds to set a feed up (plan; with drop_special also the tokenizer and a pass over the
    token ids) and to iterate one epoch, on a fresh Store each time; and the tokens delivered."""
    inits, epochs = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        feed = erstore.open(path).tokens(**options)
        t1 = time.perf_counter()
        n = sum(len(batch) for batch in feed)
        inits.append(t1 - t)
        epochs.append(time.perf_counter() - t1)
    return min(inits), min(epochs), n


def drain_loader(path: str) -> None:
    with erstore.open(path).loader(batch_size=32, shuffle=False, prefetch=4) as loader:
        for _ in loader:
            pass


def random_reads(path: str, batch_size: int, batches: int, seed: int = 0) -> int:
    """`batches` batches of uniformly random tokens via read_positions; returns tokens delivered."""
    store = erstore.open(path)
    lengths = store.index.records["length"].astype(np.int64)
    ends = np.cumsum(lengths)
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        flat = rng.integers(0, ends[-1], batch_size)
        seq = np.searchsorted(ends, flat, side="right")
        pos = flat - (ends[seq] - lengths[seq])
        unique, inverse = np.unique(seq, return_inverse=True)
        entries = store.read_positions(unique)
        np.stack([entries[i].states[p] for i, p in zip(inverse.tolist(), pos.tolist())])
    return batches * batch_size


def recompute(path: str, sequences: int, device: str, repeat: int, dtype: str = "float32") -> tuple[float, int]:
    """Seconds and tokens to compute hidden_states[k] again for the first `sequences` stored
    windows: sorted by length, batches of 32 padded to their longest (little padding once sorted)."""
    import torch

    from erstore.model import LayerExtractor

    store = erstore.open(path)
    entries = store.read_positions(np.arange(min(sequences, len(store))))
    extractor = LayerExtractor(store.recipe.model_name or "all-MiniLM-L6-v2", device=device, dtype=dtype)
    ids = sorted((e.token_ids for e in entries), key=len)
    batches = []
    for i in range(0, len(ids), 32):
        group = ids[i : i + 32]
        x = torch.zeros(len(group), len(group[-1]), dtype=torch.int64)
        mask = torch.zeros_like(x)
        for j, t in enumerate(group):
            x[j, : len(t)] = torch.from_numpy(t.astype(np.int64))
            mask[j, : len(t)] = 1
        batches.append((x.to(device), mask.to(device)))
    layer = store.recipe.layer

    def run() -> None:
        for x, mask in batches:
            extractor(x, mask, None, [layer])
        if device == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up (kernels, allocator)
    return best(run, repeat), sum(len(t) for t in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "erstore-bench-minilm-l3"))
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--random-batches", type=int, default=5)
    ap.add_argument("--recompute-sequences", type=int, default=300)
    args = ap.parse_args()
    if not (Path(args.store) / "erstore.json").exists():
        print(f"building {args.store} (MiniLM layer 3, {args.limit} documents) ...")
        erstore.build(layers=(3,), store=args.store, limit=args.limit, progress=False)
    import torch

    store = erstore.open(args.store)
    tokens, d = store.index.total_tokens, store.recipe.hidden_size
    itemsize = 2 if store.codec.to_dict().get("dtype") in ("float16", "bfloat16") else 4
    nbytes = tokens * d * itemsize
    n = args.batch_size
    load = os.getloadavg()
    print(f"store {args.store}: {len(store)} sequences, {tokens} tokens x {d}, {store.codec.to_dict()}, "
          f"{nbytes / 1e6:.1f} MB decoded; batch {n} tokens; load average {load[0]:.2f}")
    print(machine())

    feed_times(args.store, 1, batch_size=n)  # warm-up: page cache, imports
    # The bound, the Loader and the shuffled feed alternate round by round, so each round's ratio
    # compares runs made seconds apart (the machine's load drifts more than that between phases).
    rounds = []
    for _ in range(args.repeat):
        z = zstd_bound(store, 1)
        seq = best(lambda: drain_loader(args.store), 1)
        init, feed, _ = feed_times(args.store, 1, batch_size=n, seed=1)
        rounds.append((z, seq, init, feed))
    t = {"zstd": min(r[0] for r in rounds), "loader_sequential": min(r[1] for r in rounds),
         "tokens_shuffled": min(r[3] for r in rounds)}
    init = min(r[2] for r in rounds)
    _, t["tokens_sequential"], _ = feed_times(args.store, args.repeat, batch_size=n, shuffle=False)
    _, t["tokens_shuffled_fp32"], _ = feed_times(args.store, args.repeat, batch_size=n, seed=1, dtype="float32")
    init_special, t["tokens_shuffled_no_special"], delivered_no_special = feed_times(
        args.store, args.repeat, batch_size=n, seed=1, drop_special=True)
    t_random = best(lambda: random_reads(args.store, n, args.random_batches), 1)
    random_tokens = n * args.random_batches
    t_cpu, cpu_tokens = recompute(args.store, args.recompute_sequences, "cpu", 1)
    cuda = torch.cuda.is_available()
    if cuda:
        t_gpu, gpu_tokens = recompute(args.store, len(store), "cuda", args.repeat)
        t_bf16, _ = recompute(args.store, len(store), "cuda", args.repeat, dtype="bfloat16")

    gbs = {k: nbytes / v / 1e9 for k, v in t.items()}
    gbs["tokens_shuffled_no_special"] = delivered_no_special * d * itemsize / t["tokens_shuffled_no_special"] / 1e9
    tps = {k: g * 1e9 / (d * itemsize) for k, g in gbs.items()}
    tps["random_read_positions"] = random_tokens / t_random
    tps["recompute_cpu"] = cpu_tokens / t_cpu
    if cuda:
        tps["recompute_cuda"] = gpu_tokens / t_gpu
        tps["recompute_cuda_bf16"] = gpu_tokens / t_bf16
    results = {
        "store": args.store, "sequences": len(store), "tokens": tokens, "hidden_size": d, "layer": store.recipe.layer,
        "decoded_bytes": nbytes, "batch_tokens": n, "load_average_1m": round(load[0], 2),
        **{f"{k}_gbs": round(v, 3) for k, v in gbs.items()},
        **{f"{k}_tokens_s": round(v) for k, v in tps.items()},
        "tokens_shuffled_over_zstd": round(gbs["tokens_shuffled"] / gbs["zstd"], 3),
        "tokens_shuffled_over_zstd_per_round": [round(z / f, 3) for z, _, _, f in rounds],
        "tokens_shuffled_over_loader_sequential_per_round": [round(q / f, 3) for _, q, _, f in rounds],
        "tokens_shuffled_over_loader_sequential": round(gbs["tokens_shuffled"] / gbs["loader_sequential"], 3),
        "tokens_shuffled_over_random_reads": round(tps["tokens_shuffled"] / tps["random_read_positions"], 1),
        "tokens_shuffled_over_recompute_cpu": round(tps["tokens_shuffled"] / tps["recompute_cpu"], 1),
        "recompute_cpu_sequences": args.recompute_sequences, "feed_init_s": round(init, 4),
        "feed_init_drop_special_s": round(init_special, 3),
    }
    if cuda:
        results["tokens_shuffled_over_recompute_cuda"] = round(tps["tokens_shuffled"] / tps["recompute_cuda"], 2)
        results["tokens_shuffled_over_recompute_cuda_bf16"] = round(tps["tokens_shuffled"] / tps["recompute_cuda_bf16"], 2)
    print(f"{'path':<40}{'GB/s':>8}{'tokens/s':>12}")
    for k, v in gbs.items():
        print(f"{k:<40}{v:>8.3f}{tps[k]:>12.0f}")
    for k in ("random_read_positions", "recompute_cpu", "recompute_cuda", "recompute_cuda_bf16"):
        if k in tps:
            print(f"{k:<40}{tps[k] * d * itemsize / 1e9:>8.3f}{tps[k]:>12.0f}")
    print(f"token feed (shuffled) / zstd bound, per round: {results['tokens_shuffled_over_zstd_per_round']}")
    print(f"token feed (shuffled) / zstd bound: {results['tokens_shuffled_over_zstd']:.2f} (target >= 0.7); "
          f"/ sequential Loader: {results['tokens_shuffled_over_loader_sequential']:.2f}; "
          f"/ random reads: {results['tokens_shuffled_over_random_reads']:.0f}x; "
          f"/ recompute on CPU: {results['tokens_shuffled_over_recompute_cpu']:.0f}x")
    print(f"feed set-up {init * 1e3:.1f} ms; with drop_special (loads the tokenizer, reads the ids) {init_special:.2f} s")
    record("tokens", results)


if __name__ == "__main__":
    main()
