"""Reading at speed: erstore's Loader against raw baselines, measured side by side in one run.

    python benchmarks/bench_read.py --store /tmp/minilm-l3 [--limit 4000] [--batch-size 32]

Builds the store first if it does not exist (real MiniLM layer-3 states of the default corpus,
fp16). Then, on the same stored bytes:
  numpy   reading the raw fp16 states uncompressed from one file in page cache (+ fp32 cast)
  zstd    zstd-1 decompression alone of the same data, in ~768 KiB blocks (the store's chunks)
  loader  erstore Loader, sequential, block-shuffled, and block-shuffled with length buckets;
          padded fp32 batches on CPU (with a GPU also: shuffled batches delivered on it, decoded
          there or decoded on the host and copied from pinned memory)
  tiny    the Loader's fixed cost per batch: ms per batch of 32 on a store with hidden size 32
          (a 2-layer random BERT over 20k short documents, built once into --tiny-store), so
          bytes do not matter: sequential and shuffled
  gil     contention with the training loop, for producer="thread" and producer="process" side
          by side (one Loader each, serving all epochs): one shuffled epoch under a consumer that burns
          1 or 2 ms per batch holding the GIL (a pure-Python loop) and under one that burns as
          long without it (a 1-thread torch matmul); Loader throughput under the first / under
          the second (target >= 0.95), in a child process
  wait    a consumer computing ~5 ms per batch (matmuls): mean time next() takes, and the part
          of it blocked on a batch not yet ready. Three child processes: torch's defaults; with
          OMP_WAIT_POLICY=PASSIVE (idle OpenMP workers sleep instead of spinning); on 1 torch
          thread (a core left to the loader, as with a GPU consumer); with a GPU, on the GPU
GB/s are bytes of *decoded stored activations* (real tokens x d x 2 bytes for fp16), so every row
compares the same work. Appends one JSON line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def consume(store: str, batch_size: int, prefetch: int, compute_ms: float, threads: int = 0,
            device: str = "cpu") -> dict:
    """A consumer that computes (matmuls, on `threads` torch threads; 0: torch's default) about
    `compute_ms` per batch when alone on the machine, over one shuffled epoch. On "cuda" the
    batches arrive on the GPU, the matmuls run there, and each step ends with `.item()` (as a
    training loop reading its loss does), so the GPU work is not just queued.

    wait: from calling next() until the new batch is bound (what a `for batch in loader` loop
    pays); blocked: the part of it spent on an empty queue (the Loader's own `waited` counter),
    i.e. waiting for data that was not ready. The first batch is reported apart. One epoch without
    compute and a full garbage collection first: in a fresh process the first full collection
    after importing torch takes ~80 ms and would otherwise land in the measured epoch.
    """
    import torch

    options = {"batch_size": batch_size, "shuffle": True, "prefetch": prefetch, "device": device}
    with erstore.open(store).loader(seed=0, **options) as warm:
        sum(len(b["keys"]) for b in warm)
    gc.collect()

    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(2048 if device == "cuda" else 256, 256, device=device)
    b = torch.randn(256, 256, device=device)
    one = timed(lambda: [a @ b for _ in range(10)][-1].sum().item(), repeat=5) / 10
    reps = max(1, math.ceil(compute_ms / 1e3 / one))  # a fixed number of matmuls per batch
    waits, computes = [], []
    with erstore.open(store).loader(seed=1, **options) as loader:
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waits.append(time.perf_counter() - t)
            if len(waits) == 1:
                blocked_first = it.waited
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            batch["hidden_states"].sum().item()
            computes.append(time.perf_counter() - t)
        blocked = (it.waited - blocked_first) / (len(waits) - 1)
    rest = np.array(waits[1:]) * 1e3
    return {"compute_ms_mean": round(float(np.mean(computes)) * 1e3, 2),
            "wait_ms_mean": round(float(rest.mean()), 3), "wait_ms_p95": round(float(np.percentile(rest, 95)), 3),
            "blocked_ms_mean": round(blocked * 1e3, 3), "first_batch_wait_ms": round(waits[0] * 1e3, 2)}


def consume_in_child(args: argparse.Namespace, env: dict[str, str], threads: int = 0, device: str = "cpu") -> dict:
    """`consume` in a fresh process with `env` added (OpenMP reads it when torch loads)."""
    cmd = [sys.executable, __file__, "--consumer-only", "--store", args.store, "--batch-size", str(args.batch_size),
           "--prefetch", str(args.prefetch), "--compute-ms", str(args.compute_ms), "--threads", str(threads),
           "--device", device]
    out = subprocess.run(cmd, env={**os.environ, **env}, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def build_tiny(path: str) -> None:
    """A store where bytes do not matter: a 2-layer, hidden-32 random BERT (layer 1) over 20k
    short documents (3-12 words drawn from the default corpus, seeded)."""
    from bench_consumers import base_model

    from erstore.corpus import default_corpus

    folder = Path(path).parent
    model = base_model(folder / "tiny-h32-model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    words = " ".join(p.text for p in default_corpus(100_000)).split()
    rng = np.random.default_rng(0)
    corpus = folder / "tiny-corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(20_000):
            n = int(rng.integers(3, 13))
            at = int(rng.integers(0, len(words) - n))
            f.write(json.dumps({"id": str(i), "text": " ".join(words[at : at + n])}) + "\n")
    erstore.build(model=model, layers=(1,), corpus=str(corpus), store=path, progress=False)


def epoch_s(store: str, *, batch_size: int, prefetch: int, per_batch: Any = None, **options: Any) -> tuple[float, int]:
    """Seconds of one epoch (a cold cache pool; file bytes in page cache), and its batch count."""
    with erstore.open(store).loader(batch_size=batch_size, seed=0, prefetch=prefetch, **options) as loader:
        return epochs_s(loader, per_batch)


def burners(ms: float) -> tuple[Any, Any]:
    """Two consumers of about `ms` per batch alone: a pure-Python loop (holds the GIL) and a
    1-thread torch matmul loop (releases it inside each matmul)."""
    import torch

    def spin(k: int) -> int:
        x = 0
        for i in range(k):
            x += i
        return x

    one = timed(lambda: spin(20_000), repeat=5) / 20_000
    n = {"k": max(1, int(ms / 1e3 / one))}
    a, b = torch.randn(96, 96), torch.randn(96, 96)
    per = timed(lambda: [a @ b for _ in range(100)], repeat=5) / 100
    n["reps"] = max(1, round(ms / 1e3 / per))

    def python() -> None:
        spin(n["k"])

    def matmuls() -> None:
        for _ in range(n["reps"]):
            a @ b

    # Rescaled on their own measured times (best of 20, as reported), twice: a first estimate
    # from short loops was ~15% off in opposite directions for the two, which alone moved the
    # ratio by as much when the consumer is the bound.
    for _ in range(2):
        n["k"] = max(1, round(n["k"] * ms / (timed(python, repeat=20) * 1e3)))
        n["reps"] = max(1, round(n["reps"] * ms / (timed(matmuls, repeat=20) * 1e3)))
    return python, matmuls


def epochs_s(loader: Any, per_batch: Any = None) -> tuple[float, int]:
    """Seconds of the next epoch of an existing Loader, and its batch count."""
    n = 0
    t = time.perf_counter()
    for _ in loader:
        n += 1
        if per_batch is not None:
            per_batch()
    return time.perf_counter() - t, n


def gil(store: str, batch_size: int, prefetch: int, producers: tuple[str, ...] = ("thread", "process")) -> dict:
    """Loader throughput under a GIL-holding consumer vs a GIL-releasing one (see module docstring),
    for each producer side by side. One Loader per producer serves all its epochs (the process
    starts once; its start-up, to the first batch, is reported apart), over a store opened with
    no cache pool, so every epoch reads and decodes its chunks as a cold one does."""
    import torch

    torch.set_num_threads(1)
    out: dict = {}
    for producer in producers:
        options = {"batch_size": batch_size, "prefetch": prefetch, "shuffle": True, "producer": producer}
        with erstore.open(store, cache_bytes=0).loader(seed=0, **options) as loader:
            t = time.perf_counter()
            it = iter(loader)
            next(it)
            first = time.perf_counter() - t
            for _ in it:
                pass
            alone, n = min(epochs_s(loader) for _ in range(3))
            res: dict = {"first_batch_s": round(first, 3), "loader_alone_ms_per_batch": round(alone / n * 1e3, 3)}
            for ms in (1.0, 2.0):
                python, matmul = burners(ms)
                burn_py, burn_mm = timed(python, repeat=20) * 1e3, timed(matmul, repeat=20) * 1e3
                py, mm = [], []
                for _ in range(5):  # interleaved pairs: on a shared machine both see the same neighbours
                    py.append(epochs_s(loader, python)[0])
                    mm.append(epochs_s(loader, matmul)[0])
                res[f"burn_{ms:g}ms"] = {"python_burn_ms": round(burn_py, 3), "matmul_burn_ms": round(burn_mm, 3),
                                         "python_epoch_s": round(min(py), 4), "matmul_epoch_s": round(min(mm), 4),
                                         "gil_over_nogil_throughput": round(min(mm) / min(py), 3),
                                         "median_pair_ratio": round(float(np.median(np.array(mm) / np.array(py))), 3)}
        out[producer] = res
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out


def print_gil(contention: dict) -> None:
    for producer in ("thread", "process"):
        g = contention[producer]
        print(f"producer={producer}: loader alone, shuffled: {g['loader_alone_ms_per_batch']:.2f} ms/batch "
              f"(first batch after {g['first_batch_s']:.2f} s)")
        for ms in ("1", "2"):
            c = g[f"burn_{ms}ms"]
            print(f"  consumer burning ~{ms} ms/batch (python {c['python_burn_ms']:.2f} ms, matmul "
                  f"{c['matmul_burn_ms']:.2f} ms alone): throughput holding the GIL / releasing it = "
                  f"{c['gil_over_nogil_throughput']:.3f} (best of 5 each; median of pairs "
                  f"{c['median_pair_ratio']:.3f}; target >= 0.95 with producer=process)")
    print(f"  (load average {contention['load_average']})")


def baselines(path: str) -> dict:
    """numpy and zstd timings on the store's bytes, decoded once. Returns only sizes and times: the
    ~0.6 GB of arrays behind them is freed before the Loader is timed (held, it slowed the loader
    and consumer runs measurably on the 2-core machine)."""
    import zstandard

    store = erstore.open(path)
    # The same bytes, decoded once: every stored sequence concatenated in storage order.
    raw = np.concatenate([e.states for e in store.read_positions(np.arange(len(store)))])
    tokens, d = raw.shape
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "raw.bin"
        raw.tofile(file)
        np.fromfile(file, dtype=raw.dtype)  # into page cache
        t_numpy = timed(lambda: np.fromfile(file, dtype=raw.dtype).astype(np.float32))
    chunk_rows = store.codec.rows_per_chunk(d)
    blocks = [raw[i : i + chunk_rows].tobytes() for i in range(0, tokens, chunk_rows)]
    compressed = [zstandard.ZstdCompressor(level=1).compress(b) for b in blocks]
    dctx = zstandard.ZstdDecompressor()
    t_zstd = timed(lambda: [dctx.decompress(c) for c in compressed])
    return {"sequences": len(store), "tokens": tokens, "hidden_size": d, "stored_dtype": str(raw.dtype),
            "decoded_bytes": raw.nbytes, "chunk_rows": chunk_rows, "numpy_s": t_numpy, "zstd_s": t_zstd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "erstore-bench-minilm-l3"))
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--compute-ms", type=float, default=5.0)
    ap.add_argument("--tiny-store", default=str(Path(tempfile.gettempdir()) / "erstore-bench-tiny-h32" / "store"))
    ap.add_argument("--consumer-only", action="store_true", help="only the consumer measurement, as JSON")
    ap.add_argument("--gil-only", action="store_true", help="only the GIL contention measurement, as JSON")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the consumer (0: default)")
    ap.add_argument("--device", default="cpu", help="where the consumer-only measurement computes")
    args = ap.parse_args()
    if args.gil_only:
        contention = gil(args.store, args.batch_size, args.prefetch)
        print_gil(contention)
        print(json.dumps(contention))
        return
    if args.consumer_only:
        print(json.dumps(consume(args.store, args.batch_size, args.prefetch, args.compute_ms, args.threads,
                                 args.device)))
        return

    if not (Path(args.store) / "erstore.json").exists():
        print(f"building {args.store} (MiniLM layer 3, {args.limit} documents) ...")
        erstore.build(layers=(3,), store=args.store, limit=args.limit, progress=False)
    import torch

    base = baselines(args.store)
    nbytes, n_sequences = base["decoded_bytes"], base["sequences"]
    print(f"store {args.store}: {n_sequences} sequences, {base['tokens']} tokens x {base['hidden_size']}, "
          f"{base['stored_dtype']}, {nbytes / 1e6:.1f} MB decoded; batch {args.batch_size}, prefetch {args.prefetch}")
    print(machine())
    t_numpy, t_zstd = base.pop("numpy_s"), base.pop("zstd_s")

    def run_loader(shuffle: bool, bucket: bool = False, **device: Any) -> float:
        store_ = erstore.open(args.store)  # cold cache pool (file bytes stay in page cache)
        with store_.loader(batch_size=args.batch_size, shuffle=shuffle, seed=0, prefetch=args.prefetch,
                           bucket_by_length=bucket, **device) as loader:
            t = time.perf_counter()
            last = None
            for last in loader:  # noqa: B007 (the last batch is used after the loop)
                pass
            if last is not None and last["hidden_states"].is_cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t

    run_loader(False)  # warm-up: page cache, imports
    t_seq = min(run_loader(False) for _ in range(3))
    t_shuf = min(run_loader(True) for _ in range(3))
    t_bucket = min(run_loader(True, bucket=True) for _ in range(3))
    cuda = torch.cuda.is_available()
    if cuda:  # batches delivered on the GPU: decoded there (the default), or decoded on the host and copied pinned
        run_loader(True, device="cuda")
        t_cuda = min(run_loader(True, device="cuda") for _ in range(3))
        t_pinned = min(run_loader(True, device="cuda", decode_on_device=False) for _ in range(3))

    if not (Path(args.tiny_store) / "erstore.json").exists():
        print(f"building {args.tiny_store} (2-layer hidden-32 random BERT, 20k short documents) ...")
        build_tiny(args.tiny_store)
    tiny = {"batch_size": args.batch_size, "prefetch": args.prefetch}
    epoch_s(args.tiny_store, **tiny)
    t_tiny_seq, n_tiny = min(epoch_s(args.tiny_store, **tiny) for _ in range(3))
    t_tiny_shuf, _ = min(epoch_s(args.tiny_store, shuffle=True, **tiny) for _ in range(3))
    with erstore.open(args.tiny_store).loader(shuffle=True, producer="process", **tiny) as loader:
        epochs_s(loader)  # the process starts once and serves every epoch
        t_tiny_proc, _ = min(epochs_s(loader) for _ in range(3))
    gil_cmd = [sys.executable, __file__, "--gil-only", "--store", args.store, "--batch-size", str(args.batch_size),
               "--prefetch", str(args.prefetch)]
    contention = json.loads(subprocess.run(gil_cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    consumers = {"consumer": consume_in_child(args, {}),
                 "consumer_omp_passive": consume_in_child(args, {"OMP_WAIT_POLICY": "PASSIVE"}),
                 "consumer_one_thread": consume_in_child(args, {}, threads=1)}
    if cuda:
        consumers["consumer_gpu"] = consume_in_child(args, {}, device="cuda")
    gbs = lambda seconds: nbytes / seconds / 1e9  # noqa: E731
    results = {
        "store": args.store, **base, "batch_size": args.batch_size, "prefetch": args.prefetch,
        "numpy_page_cache_gbs": round(gbs(t_numpy), 3), "zstd_only_gbs": round(gbs(t_zstd), 3),
        "loader_sequential_gbs": round(gbs(t_seq), 3), "loader_shuffled_gbs": round(gbs(t_shuf), 3),
        "loader_sequential_seq_s": round(n_sequences / t_seq, 1),
        "loader_shuffled_seq_s": round(n_sequences / t_shuf, 1),
        "loader_shuffled_bucketed_gbs": round(gbs(t_bucket), 3),
        "loader_shuffled_bucketed_seq_s": round(n_sequences / t_bucket, 1),
        "bucketed_over_zstd": round(t_zstd / t_bucket, 3),
        "shuffled_over_zstd": round(t_zstd / t_shuf, 3), "sequential_over_zstd": round(t_zstd / t_seq, 3),
        **{f"{name}_{k}": v for name, c in consumers.items() for k, v in c.items()},
        "tiny_store": args.tiny_store, "tiny_sequences": len(erstore.open(args.tiny_store)),
        "tiny_sequential_ms_per_batch": round(t_tiny_seq / n_tiny * 1e3, 4),
        "tiny_shuffled_ms_per_batch": round(t_tiny_shuf / n_tiny * 1e3, 4),
        "tiny_shuffled_process_ms_per_batch": round(t_tiny_proc / n_tiny * 1e3, 4),
        "gil": contention, "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if cuda:
        results.update(loader_cuda_shuffled_gbs=round(gbs(t_cuda), 3), cuda_shuffled_over_zstd=round(t_zstd / t_cuda, 3),
                       loader_cuda_pinned_shuffled_gbs=round(gbs(t_pinned), 3),
                       cuda_pinned_shuffled_over_zstd=round(t_zstd / t_pinned, 3))
    print(f"{'path':<28}{'GB/s':>8}{'seq/s':>10}")
    print(f"{'numpy, page cache (+fp32)':<28}{results['numpy_page_cache_gbs']:>8.3f}")
    print(f"{'zstd-1 decompress only':<28}{results['zstd_only_gbs']:>8.3f}")
    print(f"{'loader sequential':<28}{results['loader_sequential_gbs']:>8.3f}{results['loader_sequential_seq_s']:>10.0f}")
    print(f"{'loader shuffled (blocks)':<28}{results['loader_shuffled_gbs']:>8.3f}{results['loader_shuffled_seq_s']:>10.0f}")
    print(f"{'loader shuffled + buckets':<28}{results['loader_shuffled_bucketed_gbs']:>8.3f}{results['loader_shuffled_bucketed_seq_s']:>10.0f}")
    if cuda:
        print(f"{'loader shuffled -> cuda':<28}{results['loader_cuda_shuffled_gbs']:>8.3f}")
        print(f"{'  (host decode, pinned)':<28}{results['loader_cuda_pinned_shuffled_gbs']:>8.3f}")
    print(f"shuffled / zstd bound: {results['shuffled_over_zstd']:.2f} (target >= 0.7)")
    print(f"tiny store (d=32, {results['tiny_sequences']} sequences), ms per batch: sequential "
          f"{results['tiny_sequential_ms_per_batch']:.3f}, shuffled {results['tiny_shuffled_ms_per_batch']:.3f}, "
          f"shuffled with producer=process {results['tiny_shuffled_process_ms_per_batch']:.3f} (target <= 0.25)")
    print_gil(contention)
    print(f"load average {results['load_average']}")
    labels = {"consumer": "consumer", "consumer_omp_passive": "consumer, OMP_WAIT_POLICY=PASSIVE",
              "consumer_one_thread": "consumer on 1 torch thread", "consumer_gpu": "consumer on the GPU"}
    for name, c in consumers.items():
        print(f"{labels[name]} computing {c['compute_ms_mean']:.1f} ms/batch: next() takes "
              f"{c['wait_ms_mean']:.3f} ms/batch on average (p95 {c['wait_ms_p95']:.3f}), of which blocked "
              f"on a batch not yet ready {c['blocked_ms_mean']:.3f} ms; first batch {c['first_batch_wait_ms']:.1f} ms")
    record("read", results)


if __name__ == "__main__":
    main()
