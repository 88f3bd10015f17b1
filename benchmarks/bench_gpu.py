"""Recycled vs full on a GPU, measured side by side in one run (needs CUDA).

    python benchmarks/bench_gpu.py [--models minilm,base] [--batches 40] [--dtypes float32,bfloat16]

Models: MiniLM-L6-H384 (store at layer 3) and BERT-base (12 x 768, store at layer 6), both with
random weights from their configs: speed does not depend on the weights. Stores are built on
the GPU, fp16 + zstd (erstore's default codec), from 128-token windows of the default corpus.
Per model and compute dtype, ms per batch of 32 x 128 tokens, each the mean over `--batches`
batches with one CUDA synchronize at the end (a pipelined steady state):
  full          the whole model on token ids already on the GPU
  tail only     layers k..N-1 on hidden states already on the GPU (the compute bound of recycling)
  recycled      Loader(device="cuda", shuffle=True): read + decompress on the host, copy the fp16
                codes, decode and pad on the GPU, then layers k..N-1
  loader only   the same Loader with no model (what storage can deliver)
Appends one JSON line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_consumers import B, L, base_model  # noqa: E402
from common import machine, record  # noqa: E402

import erstore  # noqa: E402

CONFIGS = {  # name: (BertConfig overrides, recycled layer k)
    "minilm": ({"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}, 3),
    "base": ({}, 6),
}


def corpus(folder: Path) -> Path:
    """The default corpus joined into documents of 100 paragraphs, so nearly every window is a
    full 128 tokens (~2000 of them)."""
    import json

    from erstore.corpus import default_corpus

    paragraphs = default_corpus(100_000)
    docs = [" ".join(p.text for p in paragraphs[i : i + 100]) for i in range(0, len(paragraphs), 100)]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(docs)))
    return path


def per_batch_ms(run, n: int) -> float:
    """Mean ms of `run(i)` over i < n, timed as one pipelined stretch ended by one synchronize."""
    import torch

    run(0)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(n):
        run(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3 / n


def bench_dtype(dtype: Any, full: Any, store: erstore.Store, model: str, keys: list[str], ids: list[Any],
                batches: int) -> dict:
    """One row: full, tail only, loader only and recycled, in `dtype`."""
    import torch

    from consumers import load_tail

    full = full.to(dtype)
    tail = load_tail(store, model=model, device="cuda", dtype=str(dtype).removeprefix("torch."))
    mask = torch.ones(B, L, dtype=torch.long, device="cuda")
    states = [torch.randn(B, L, tail.hidden_size, device="cuda", dtype=dtype) for _ in range(4)]

    def loader() -> Any:  # a cold cache pool each time: chunks come from the page cache
        return erstore.open(store.location.url).loader(keys, batch_size=B, shuffle=True, seed=0, prefetch=4,
                                                       device="cuda", dtype=dtype)

    def recycle(batches_: Iterator[dict]) -> None:
        batch = next(batches_)
        tail(batch["hidden_states"], batch["attention_mask"])

    with torch.inference_mode():
        full_ms = per_batch_ms(lambda i: full(input_ids=ids[i], attention_mask=mask), batches)
        tail_ms = per_batch_ms(lambda i: tail(states[i % 4], mask), batches)
        with loader() as only:
            it = iter(only)
            load_ms = per_batch_ms(lambda i: next(it), batches)
        with loader() as both:
            it = iter(both)
            recycled_ms = per_batch_ms(lambda i: recycle(it), batches)
    row = {"full_ms": full_ms, "tail_only_ms": tail_ms, "recycled_ms": recycled_ms, "loader_only_ms": load_ms}
    row = {k: round(v, 2) for k, v in row.items()}
    row["recycled_speedup"] = round(full_ms / recycled_ms, 3)
    row["tail_only_speedup"] = round(full_ms / tail_ms, 3)
    return row


def bench_model(name: str, batches: int, dtypes: list[str], work: Path, corpus_file: Path) -> dict:
    import torch

    from erstore.model import LayerExtractor

    overrides, layer = CONFIGS[name]
    model = base_model(work / f"{name}-random", **overrides)
    path = work / f"{name}-l{layer}"
    if not (path / "erstore.json").exists():
        erstore.build(model=model, layers=(layer,), corpus=str(corpus_file), store=str(path),
                      max_length=L, device="cuda", progress=False)
    store = erstore.open(str(path))
    keys = [e.key for e in store.read(list(store)) if len(e.token_ids) == L][: (batches + 1) * B]
    if len(keys) < (batches + 1) * B:
        raise SystemExit(f"{name}: only {len(keys)} full {L}-token windows; lower --batches")
    entries = {e.key: e for e in store.read(keys)}
    ids = [torch.tensor([entries[k].token_ids.tolist() for k in keys[i * B : (i + 1) * B]], device="cuda")
           for i in range(batches + 1)]
    out: dict = {"model": name, "layer": layer, "batches": batches, "batch": [B, L]}
    extractor = LayerExtractor(model, device="cuda")
    n_layers = extractor.num_layers
    out["num_layers"], out["theoretical"] = n_layers, round(n_layers / (n_layers - layer), 3)

    for dtype_name in dtypes:
        row = bench_dtype(getattr(torch, dtype_name), extractor.model, store, model, keys, ids, batches)
        out[dtype_name] = row
        print(f"[{name} {dtype_name}] {row}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,base")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "erstore-bench-gpu"))
    ap.add_argument("--corpus", help="JSONL corpus to build from (default: written from the default corpus, "
                                     "whose size depends on the Python installation's standard library)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU (none found)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(machine())
    corpus_file = Path(args.corpus) if args.corpus else corpus(work)
    results = [bench_model(name, args.batches, args.dtypes.split(","), work, corpus_file)
               for name in args.models.split(",")]
    record("gpu", {"settings": {"batch": [B, L], "batches": args.batches}, "results": results})


if __name__ == "__main__":
    main()
