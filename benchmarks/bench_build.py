"""Build cost, bytes per value and scale of the core store (issue: the core).

1. Build time / bare forward of layers 0..k over the same corpus (same tokenizer, windows and
   equal-length batches; model and corpus loading excluded from both). Target <= 1.10 on CPU.
2. Bytes per stored value for float32 / float16 / bfloat16, beside the paper's figures
   (512 x 768 padded: 1.6 MB fp32, 0.8 MB fp16 = 4 and 2 bytes per value, padding included).
3. Scale: open time, random get latency and index bytes for synthetic stores of 10k and 1M
   sequences.
4. Corpus scale (`--only corpus`): peak RSS, time to first batch, tokens/s and forward-pass wait
   for writing, for builds of 2k / 20k / 200k / 2M unique synthetic short documents with a tiny
   random BERT (hidden 32, 2 layers, MiniLM tokenizer); each size in a fresh subprocess so that
   peak RSS is that build's alone. Sizes that do not finish within `--timeout` are reported so.
5. Commit time against store size (`--only commit`): a writer over a synthetic store of N
   sequences appends 1,000 new ones; open, journal and commit times for N = 10k .. 1M.

Run: HF_HUB_OFFLINE=1 python benchmarks/bench_build.py [--limit 2000] [--scale 1000000]
     HF_HUB_OFFLINE=1 python benchmarks/bench_build.py --only corpus --sizes 2000,20000,200000,2000000
"""

from __future__ import annotations

import argparse
import os
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


def bare_forward(docs, layer: int, batch_size: int, max_length: int, stride: int) -> float:
    """Tokenize + forward layers 0..k-1 with the build's windows and batching, storing nothing."""
    import torch

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    extractor = LayerExtractor(DEFAULT_MODEL)
    windower = Windower(tokenizer, max_length, stride)
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
        bare = None
        for dtype in ("float32", "float16", "bfloat16"):
            store = tmp / f"build-{dtype}-{r}"
            # The documents already read, as bare_forward has them (reading the default corpus parses
            # stdlib sources, ~1.5 ms per document: it would count as the build's tokenize time).
            [res] = build(BuildConfig(corpus=docs, store=str(store), dtype=dtype, progress=False))
            if bare is None:  # the same windows as the build's defaults (its recipe)
                recipe = erstore.open(store).recipe
                bare = bare_forward(docs, 3, 32, recipe.max_length, recipe.stride)
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


CORPUS_WORDS = ("time person year way day thing man world life hand part child eye woman place work week "
                "case point government company number group problem fact water story money month "
                "lot right study book job word business issue side kind head house service friend "
                "father power hour game line end member law car city community name president team "
                "minute idea kid body information back parent face others level office door health").split()


def tiny_model(folder: Path) -> Path:
    """A random BERT with hidden 32 and 2 layers, and the packaged MiniLM's tokenizer."""
    import transformers

    from erstore.tokenize import resolve_model

    if (folder / "config.json").exists():
        return folder
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=512)
    transformers.BertModel(config).save_pretrained(folder)
    source = Path(resolve_model(DEFAULT_MODEL))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def synthetic_corpus(path: Path, n: int) -> Path:
    """n unique short documents (~18 tokens each), one per line; the number makes each unique."""
    rng = np.random.default_rng(n)
    words = np.array(CORPUS_WORDS)
    with path.open("w") as f:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            picks = words[rng.integers(0, len(words), size=(m, 12))]
            f.writelines(f"Document {start + i} is about {' '.join(row)}.\n" for i, row in enumerate(picks))
    return path


def vm(field: str) -> float:
    """MiB of a /proc/self/status field (VmHWM: peak RSS of this process image; unlike
    ru_maxrss it does not inherit the peak of the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def one_corpus_build(n: int, tmp: Path, buffer_tokens: int | None, tune_malloc: bool = True) -> dict:
    """Run in a fresh process: one build of n documents; report its peak RSS and timings.

    RSS is sampled every 50 ms so that the peak can be split by phase (streaming compute vs the
    commit), which is where a peak that grows with the corpus would show.
    """
    import threading

    model, corpus = tmp / "tiny-bert", tmp / f"corpus-{n}.txt"  # made by the parent process
    import torch  # noqa: F401 - counted in the baseline, as a build imports it anyway
    import transformers  # noqa: F401

    rss_start = vm("VmRSS")
    options = {} if buffer_tokens is None else {"buffer_tokens": buffer_tokens}
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            samples.append((time.perf_counter(), vm("VmRSS")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    [res] = build(BuildConfig(model=str(model), corpus=str(corpus), store=str(tmp / f"store-{n}"), layers=(1,),
                              max_length=128, progress=False, tune_malloc=tune_malloc, **options))
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    commit_start = t0 + wall - res.phases.get("commit", 0.0)
    info = res.version.build
    return {"documents": n, "tokens": res.version.totals.tokens, "windows": res.windows,
            "peak_rss_mib": vm("VmHWM"), "rss_before_build_mib": rss_start, "wall_s": round(wall, 1),
            "peak_rss_streaming_mib": max((r for t, r in samples if t < commit_start), default=None),
            "peak_rss_commit_mib": max((r for t, r in samples if t >= commit_start), default=None),
            "tune_malloc": tune_malloc, "index_parts": sum(res.version.parts.get(b, [1, 1])[0]
                                                           for b in res.version.indexes),
            "first_batch_s": info["first_batch_s"], "phases": res.phases,
            "tokens_per_s_end_to_end": round(res.version.totals.tokens / wall, 1),
            "write_wait_s": info["write_wait_s"], "store_mb": round(res.version.totals.bytes / 1e6, 1)}


def corpus_scale(sizes: list[int], timeout: float, buffer_tokens: int | None, tune_malloc: bool = True) -> list[dict]:
    import json
    import subprocess

    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tiny_model(Path(tmp) / "tiny-bert")
            synthetic_corpus(Path(tmp) / f"corpus-{n}.txt", n)
            cmd = [sys.executable, __file__, "--one-corpus", str(n), "--tmp", tmp]
            if buffer_tokens is not None:
                cmd += ["--buffer-tokens", str(buffer_tokens)]
            if not tune_malloc:
                cmd += ["--no-tune-malloc"]
            try:
                # One torch thread: with 2 threads on these shared, loaded cores, OpenMP's spinning
                # made the same forward pass 20-50x slower (old and new builder alike).
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True,
                                     env=env).stdout
                row = json.loads(out.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row = {"documents": n, "error": f"did not finish within {timeout:.0f} s"}
            except subprocess.CalledProcessError as e:
                row = {"documents": n, "error": e.stderr.strip().splitlines()[-1] if e.stderr else str(e)}
        print(row, flush=True)
        rows.append(row)
    return rows


def resume_scale(n: int, tmp: Path) -> dict:
    """A build of n documents dies after half its windows; the rerun skips the durable documents.

    Reports how many documents the rerun skipped (read and digested, not tokenized) and
    tokenized, its tokenize time against the uninterrupted build's, and the rate of reading and
    digesting documents against tokenizing them (the cost a skip replaces).
    """
    from erstore.builder import _hash_document
    from erstore.corpus import iter_corpus

    import xxhash

    model, corpus = tiny_model(tmp / "tiny-bert"), synthetic_corpus(tmp / f"corpus-{n}.txt", n)
    common = dict(model=str(model), corpus=str(corpus), layers=(1,), max_length=128, progress=False)

    class Dies(StoreWriter):
        def append(self, *args, **kwargs):
            if self._appended >= n // 2:
                raise RuntimeError("killed")
            super().append(*args, **kwargs)

    t0 = time.perf_counter()
    try:
        build(BuildConfig(store=str(tmp / "s"), store_options={"journal_seconds": 2.0}, **common), writer=Dies)
    except RuntimeError:
        pass
    killed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    [res] = build(BuildConfig(store=str(tmp / "s"), **common))
    resume_s = time.perf_counter() - t0
    [clean] = build(BuildConfig(store=str(tmp / "clean"), **common))
    t0 = time.perf_counter()
    h = xxhash.xxh3_128()
    count = sum(1 for d in iter_corpus(str(corpus)) if _hash_document(h, d) is None)
    read_s = time.perf_counter() - t0
    info = res.version.build
    return {"documents": n, "killed_after_s": round(killed_s, 1), "skipped_documents": info["skipped_documents"],
            "tokenized_documents": info["tokenized_documents"], "resumed_sequences": res.resumed,
            "computed": res.computed, "resume_wall_s": round(resume_s, 1), "clean_wall_s": round(clean.seconds, 1),
            "resume_tokenize_s": res.phases["tokenize"], "clean_tokenize_s": clean.phases["tokenize"],
            "read_and_digest_docs_per_s": round(count / read_s),
            "tokenize_docs_per_s": round(n / max(clean.phases["tokenize"], 1e-9))}


def commit_scale(sizes: list[int], tmp: Path, d: int = 16, new: int = 1000) -> list[dict]:
    """Open + append `new` sequences + commit, on synthetic stores of `sizes` sequences."""
    rng = np.random.default_rng(1)
    recipe = Recipe(model_fingerprint="synthetic", layer=1, tokenizer_fingerprint="synthetic", max_length=8,
                    stride=0, codec=LosslessCodec("float16").to_dict(), hidden_size=d, num_layers=2)
    rows = []
    for n in sizes:
        path = tmp / f"commit-{n}"
        states = rng.standard_normal((8, d)).astype(np.float32)
        with StoreWriter(path, recipe) as w:
            for i in range(n):
                w.append(key_for_ids([i, 1, 2, 3]), states[:4], np.asarray([i, 1, 2, 3]))
            w.commit()
        t0 = time.perf_counter()
        w = StoreWriter(path, recipe)
        opened = time.perf_counter() - t0
        for i in range(n, n + new):
            w.append(key_for_ids([i, 1, 2, 3]), states[:4], np.asarray([i, 1, 2, 3]))
        t0 = time.perf_counter()
        w._flush(final=True)
        flushed = time.perf_counter() - t0
        t0 = time.perf_counter()
        w.commit()
        committed = time.perf_counter() - t0
        w.close()
        index_bytes = max((p for p in (path / "index").glob("*.idx")), key=lambda p: p.stat().st_mtime).stat().st_size
        rows.append({"store_sequences": n, "new_sequences": new, "open_s": round(opened, 3),
                     "final_flush_s": round(flushed, 3), "commit_s": round(committed, 3),
                     "new_index_bytes": index_bytes})
        print(rows[-1], flush=True)
        shutil.rmtree(path)
    return rows


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
    ap.add_argument("--only", choices=["build", "scale", "corpus", "commit", "resume"], default=None)
    ap.add_argument("--resume-size", type=int, default=200_000, help="documents (--only resume)")
    ap.add_argument("--sizes", default="2000,20000,200000,2000000", help="corpus sizes (--only corpus)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per corpus size")
    ap.add_argument("--buffer-tokens", type=int, default=None)
    ap.add_argument("--no-tune-malloc", action="store_true", help="build without BuildConfig.tune_malloc "
                    "(the CLI turns it on)")
    ap.add_argument("--commit-sizes", default="10000,100000,1000000")
    ap.add_argument("--one-corpus", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_corpus is not None:
        import json

        print(json.dumps(one_corpus_build(args.one_corpus, Path(args.tmp), args.buffer_tokens,
                                          not args.no_tune_malloc)))
        return
    print(machine())
    if args.only == "resume":
        load = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            row = resume_scale(args.resume_size, Path(tmp))
        print(row)
        record("build_resume", {"resume": row, "load_average": load, "load_average_after": os.getloadavg()})
        return
    if args.only in ("corpus", "commit"):
        load = os.getloadavg()
        if args.only == "corpus":
            rows = corpus_scale([int(x) for x in args.sizes.split(",")], args.timeout, args.buffer_tokens,
                                not args.no_tune_malloc)
            record("build_corpus_scale", {"corpus_scale": rows, "load_average": load, "load_average_after": os.getloadavg(),
                                          "buffer_tokens": args.buffer_tokens, "tune_malloc": not args.no_tune_malloc})
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rows = commit_scale([int(x) for x in args.commit_sizes.split(",")], Path(tmp))
            record("build_commit_scale", {"commit_scale": rows, "load_average": load})
        return
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
