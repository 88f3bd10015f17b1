"""Recycled vs tail-only vs full on a GPU, inference and training, side by side in one run (needs CUDA).

    python benchmarks/bench_gpu.py [--models minilm,base] [--batches 20] [--dtypes float32,bfloat16]
                                   [--batch-sizes 32,256] [--stores fp16,bf16-shuffle,int8] [--epochs 6]

Models: MiniLM-L6-H384 (store at layer 3) and BERT-base (12 x 768, store at layer 6), both with
random weights from their configs (speed does not depend on the weights). Per model three stores
are built on the GPU from 128-token windows of the default corpus: `fp16` (the default codec),
`bf16-shuffle` (`--codec shuffle --dtype bfloat16`) and `int8` (`--codec int8`).

Inference, per model x compute dtype x batch size (B x 128 tokens) x store, ms per batch, each the
mean over `--batches` batches with one CUDA synchronize at the end (a pipelined steady state):
  full          the whole model on token ids already on the GPU
  tail only     layers k..N-1 on hidden states already on the GPU (the compute bound of recycling)
  loader only   Loader(device=DEVICE, shuffle=True) with no model, and the GB/s of hidden states
                it delivers on the device, beside the pinned host-to-device copy bandwidth
                measured in the same run
  recycled      the same Loader feeding layers k..N-1; target recycled / tail only <= 1.10
  copies, kernels  host-to-device copies and kernel launches per batch of the Loader alone
                (torch.profiler over `--batches` batches)
Training (the paper's Table 5), batch 32 x 128, fp32, AdamW, a sequence-classification head, ms/step:
  NR            full fine-tuning of all layers on token ids on the GPU
  R on device   the reduced model (layers k..N-1 + head) on states already on the GPU
  R             the same step on batches from the fp16 store via Loader(device=DEVICE);
                target R / R on device <= 1.10
  SR            save-and-recycle over `--epochs` epochs: epoch 1 runs layers 0..k-1, writes an
                fp16 store and trains; later epochs train from it; total time / steps, as a
                speedup over NR and as a fraction of the theoretical N / (N - k)
Appends one JSON line to benchmarks/results.jsonl. To compare with another erstore (e.g. the
commit before a change), run the script again with `--erstore-root OTHER_CHECKOUT`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if "--erstore-root" in sys.argv:  # import erstore from another checkout (the baseline of an A/B)
    ROOT = Path(sys.argv[sys.argv.index("--erstore-root") + 1]).resolve()
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from bench_consumers import L, base_model  # noqa: E402
from common import machine, record  # noqa: E402

import erstore  # noqa: E402

CONFIGS = {  # name: (BertConfig overrides, recycled layer k)
    "minilm": ({"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}, 3),
    "base": ({}, 6),
}
DEVICE = "cuda"  # --smoke-cpu runs the whole script on the CPU, tiny, to check it (no timings worth keeping)
STORES = {"fp16": ("float16", "lossless"), "bf16-shuffle": ("bfloat16", "shuffle"), "int8": ("float16", "int8")}


def corpus(folder: Path, paragraphs: int = 100_000) -> Path:
    """The default corpus joined into documents of 100 paragraphs, so nearly every window is a
    full 128 tokens (~2000 of them)."""
    import json

    from erstore.corpus import default_corpus

    rows = default_corpus(paragraphs)
    docs = [" ".join(p.text for p in rows[i : i + 100]) for i in range(0, len(rows), 100)]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(docs)))
    return path


def per_batch_ms(run, n: int) -> float:
    """Mean ms of `run(i)` over i < n, timed as one pipelined stretch ended by one synchronize."""
    run(0)  # warm-up (kernels, allocator)
    sync()
    t = time.perf_counter()
    for i in range(n):
        run(i + 1)
    sync()
    return (time.perf_counter() - t) * 1e3 / n


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def endless(loader: Any) -> Iterator[dict]:
    """The loader's batches epoch after epoch (a store may hold fewer batches than are timed)."""
    while True:
        yield from loader


def pinned_h2d_gbs() -> float:
    """Host-to-device bandwidth of one 256 MB copy from pinned memory (best of 5)."""
    import torch

    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=DEVICE)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return host.numel() / best / 1e9


def count_launches(make_loader, n: int) -> dict:
    """Host-to-device copies and kernel launches per batch of the Loader alone (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if DEVICE != "cuda":
        return {}
    try:
        with make_loader() as loader:
            it = endless(loader)
            for _ in range(3):
                next(it)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    next(it)
                torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        launches = sum(1 for x in names if x in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                   "cuLaunchKernelEx"))
        copies = sum(1 for x in names if x.startswith("cudaMemcpy") or x.startswith("cuMemcpy"))
        return {"copies_per_batch": round(copies / n, 2), "kernel_launches_per_batch": round(launches / n, 2)}
    except Exception as e:  # noqa: BLE001 - profiling is a report, never a reason to lose the run
        return {"profile_error": f"{type(e).__name__}: {e}"}


def inference(name: str, model: str, path: str, keys: list[str], ids: list[Any], full: Any, dtype: Any, b: int,
              batches: int, stores: dict[str, Path], producers: tuple[str, ...] = ("thread",)) -> list[dict]:
    """Rows for one model x compute dtype x batch size: every store (and Loader producer) side by side."""
    import torch

    from consumers import load_tail

    tail = load_tail(erstore.open(path), model=model, device=DEVICE, dtype=str(dtype).removeprefix("torch."))
    mask = torch.ones(b, L, dtype=torch.long, device=DEVICE)
    states = [torch.randn(b, L, tail.hidden_size, device=DEVICE, dtype=dtype) for _ in range(4)]
    batch_ids = [torch.cat([ids[(i * b // 32 + j) % len(ids)] for j in range(b // 32)]) for i in range(4)]
    rows = []
    with torch.inference_mode():
        full_ms = per_batch_ms(lambda i: full(input_ids=batch_ids[i % 4], attention_mask=mask), batches)
        tail_ms = per_batch_ms(lambda i: tail(states[i % 4], mask), batches)
        for store_name, store_path, producer in [(n, p, q) for n, p in stores.items() for q in producers]:
            def loader(store_path=store_path, producer=producer) -> Any:  # a cold cache pool each time
                # (producer="process": its start-up falls in per_batch_ms's untimed warm-up call)
                return erstore.open(str(store_path)).loader(keys, batch_size=b, shuffle=True, seed=0, prefetch=4,
                                                            device=DEVICE, dtype=dtype, drop_last=True,
                                                            producer=producer)

            with loader() as only:
                it = endless(only)
                load_ms = per_batch_ms(lambda i, it=it: next(it), batches)
            with loader() as both:
                it = endless(both)

                def recycle(i: int, it: Any = it) -> None:
                    batch = next(it)
                    tail(batch["hidden_states"], batch["attention_mask"])

                recycled_ms = per_batch_ms(recycle, batches)
            delivered = b * L * tail.hidden_size * torch.empty(0, dtype=dtype).element_size()
            row = {"model": name, "compute": str(dtype).removeprefix("torch."), "batch": [b, L], "store": store_name,
                   "producer": producer,
                   "full_ms": round(full_ms, 3), "tail_only_ms": round(tail_ms, 3),
                   "loader_only_ms": round(load_ms, 3), "recycled_ms": round(recycled_ms, 3),
                   "recycled_over_tail": round(recycled_ms / tail_ms, 3),
                   "recycled_speedup": round(full_ms / recycled_ms, 3),
                   "loader_delivered_gbs": round(delivered / load_ms / 1e6, 2),
                   **count_launches(loader, batches)}
            rows.append(row)
            print(f"[{name} {row['compute']} {b}x{L} {store_name}] {row}", flush=True)
    return rows


def training(name: str, model: str, layer: int, path: Path, keys: list[str], ids: list[Any], batches: int,
             epochs: int, work: Path) -> dict:
    """NR, R on device, R and SR steps, batch 32 x 128, fp32 (see the module docstring)."""
    import torch

    from consumers import ReducedModel, SequenceClassificationHead
    from consumers.train import make_optimizer, step
    from erstore.model import LayerExtractor
    from erstore.writer import StoreWriter

    b = 32
    store = erstore.open(str(path))
    labels = {k: i % 4 for i, k in enumerate(keys)}
    label_batches = [torch.tensor([labels[k] for k in keys[i * b : (i + 1) * b]], device=DEVICE)
                     for i in range(len(ids))]
    mask = torch.ones(b, L, dtype=torch.long, device=DEVICE)
    n_ids = len(ids)

    class Full(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body
            self.head = SequenceClassificationHead(body.config.hidden_size, 4)

        def forward(self, input_ids, attention_mask, labels):
            h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return {"loss": torch.nn.functional.cross_entropy(self.head(h), labels)}

    out: dict = {"model": name, "batch": [b, L], "compute": "float32"}
    torch.manual_seed(0)
    net = Full(LayerExtractor(model, device=DEVICE).model).to(DEVICE).train()
    opt = make_optimizer(net, lr=2e-5)
    out["NR_ms"] = per_batch_ms(lambda i: step(net, opt, {"input_ids": ids[i % n_ids], "attention_mask": mask,
                                                         "labels": label_batches[i % n_ids]}), batches)
    net = opt = None  # freed before the reduced model is made
    reduced = ReducedModel.for_store(store, task="sequence", num_labels=4, model=model).to(DEVICE).train()
    opt = make_optimizer(reduced, lr=2e-5)
    states = [torch.randn(b, L, reduced.tail.hidden_size, device=DEVICE) for _ in range(4)]
    out["R_on_device_ms"] = per_batch_ms(lambda i: step(reduced, opt, {"hidden_states": states[i % 4],
                                                                       "attention_mask": mask,
                                                                       "labels": label_batches[i % n_ids]}), batches)
    with store.loader(keys, labels=labels, batch_size=b, shuffle=True, seed=0, prefetch=4, device=DEVICE,
                      drop_last=True) as loader:
        it = endless(loader)
        out["R_ms"] = per_batch_ms(lambda i: step(reduced, opt, next(it)), batches)

    # SR: epoch 1 computes layers 0..k-1, writes them and trains; epochs 2.. read them back.
    extractor = LayerExtractor(model, device=DEVICE)
    sr_path = work / f"{name}-sr-{time.time_ns()}"
    torch.manual_seed(0)
    sr_model = ReducedModel.for_store(store, task="sequence", num_labels=4, model=model).to(DEVICE).train()
    sr_opt = make_optimizer(sr_model, lr=2e-5)
    sr_keys = keys[: len(ids) * b]
    sync()
    t0 = time.perf_counter()
    with StoreWriter(str(sr_path), store.recipe) as writer:
        for i in range(len(ids)):
            h = extractor(ids[i], mask, None, [layer])[layer].float().clone()  # not an inference tensor
            step(sr_model, sr_opt, {"hidden_states": h, "attention_mask": mask, "labels": label_batches[i]})
            host, host_ids = h.float().cpu().numpy(), ids[i].cpu().numpy().astype(np.int32)
            for j, k in enumerate(sr_keys[i * b : (i + 1) * b]):
                writer.append(k, host[j], host_ids[j])
        writer.commit(build={"source": "bench_gpu SR"})
    with erstore.open(str(sr_path)).loader(sr_keys, labels=labels, batch_size=b, shuffle=True, seed=0, prefetch=4,
                                           device=DEVICE, drop_last=True) as loader:
        loader.set_epoch(1)
        for _ in range(1, epochs):
            for batch in loader:
                step(sr_model, sr_opt, batch)
    sync()
    sr_ms = (time.perf_counter() - t0) * 1e3 / (epochs * len(ids))
    n_layers = extractor.num_layers
    theory = n_layers / (n_layers - layer)
    out.update(SR_ms=sr_ms, SR_epochs=epochs, theoretical=round(theory, 3))
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    out["R_over_on_device"] = round(out["R_ms"] / out["R_on_device_ms"], 3)
    out["SR_speedup"] = round(out["NR_ms"] / sr_ms, 3)
    out["SR_of_theory"] = round(out["NR_ms"] / sr_ms / theory, 3)
    out["R_speedup"] = round(out["NR_ms"] / out["R_ms"], 3)
    print(f"[{name} training] {out}", flush=True)
    return out


def bench_model(name: str, args: argparse.Namespace, work: Path, corpus_file: Path) -> dict:
    import torch

    from erstore.model import LayerExtractor

    overrides, layer = CONFIGS[name]
    model = base_model(work / f"{name}-random", **overrides)
    t0 = time.perf_counter()
    stores = {}
    for store_name in args.stores.split(","):
        dtype, codec = STORES[store_name]
        path = work / f"{name}-l{layer}-{store_name}"
        if not (path / "erstore.json").exists():
            erstore.build(model=model, layers=(layer,), corpus=str(corpus_file), store=str(path), dtype=dtype,
                          codec=codec, max_length=L, device=DEVICE, progress=False)
        stores[store_name] = path
    first = erstore.open(str(next(iter(stores.values()))))
    keys = sorted(e.key for e in first.read(list(first)) if len(e.token_ids) == L)
    entries = {e.key: e for e in first.read(keys)}
    ids = [torch.tensor(np.stack([entries[k].token_ids for k in keys[i * 32 : (i + 1) * 32]]).astype(np.int64),
                         device=DEVICE)
           for i in range(len(keys) // 32)]
    print(f"[{name}] {len(stores)} stores, {len(keys)} full windows ({time.perf_counter() - t0:.0f} s)", flush=True)
    extractor = LayerExtractor(model, device=DEVICE)
    out: dict = {"model": name, "layer": layer, "num_layers": extractor.num_layers,
                 "theoretical": round(extractor.num_layers / (extractor.num_layers - layer), 3), "inference": []}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        full = extractor.model.to(dtype)
        for b in (int(x) for x in args.batch_sizes.split(",")):
            if len(keys) < 2 * b:
                print(f"[{name}] only {len(keys)} windows: skipping batch {b}")
                continue
            out["inference"] += inference(name, model, first.location.url, keys, ids, full, dtype, b, args.batches, stores,
                                          tuple(args.producers.split(",")))
    extractor.model.to(torch.float32)
    del extractor, full
    if args.epochs:
        out["training"] = training(name, model, layer, stores.get("fp16", next(iter(stores.values()))), keys, ids,
                                   args.batches, args.epochs, work)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,base")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batch-sizes", default="32,256")
    ap.add_argument("--stores", default=",".join(STORES))
    ap.add_argument("--epochs", type=int, default=6, help="SR epochs (0: no training rows)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "erstore-bench-gpu"))
    ap.add_argument("--erstore-root", help="import erstore from this checkout instead (an A/B baseline)")
    ap.add_argument("--producers", default="thread",
                    help="Loader producers measured side by side: thread, process or thread,process")
    ap.add_argument("--smoke-cpu", action="store_true", help="run everything on the CPU (to check the script)")
    ap.add_argument("--corpus", help="JSONL corpus to build from (default: written from the default corpus, "
                                     "whose size depends on the Python installation's standard library)")
    args = ap.parse_args()

    import torch

    global DEVICE
    if args.smoke_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU (none found; --smoke-cpu checks the script on the CPU)")
    t0 = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(machine(), f"erstore from {Path(erstore.__file__).parent}")
    corpus_file = Path(args.corpus) if args.corpus else corpus(work, 600 if args.smoke_cpu else 100_000)
    h2d = pinned_h2d_gbs() if DEVICE == "cuda" else 0.0
    print(f"pinned host-to-device copy: {h2d:.1f} GB/s", flush=True)
    results = [bench_model(name, args, work, corpus_file) for name in args.models.split(",")]
    print("\nmodel    compute   batch   store         tail ms  recycled ms  ratio (<=1.10)  loader GB/s  copies  kernels")
    for r in results:
        for row in r["inference"]:
            print(f"{row['model']:<8} {row['compute']:<9} {row['batch'][0]:>5}   {row['store'] + ('*' if row['producer'] == 'process' else ''):<13} "
                  f"{row['tail_only_ms']:>7.2f}  {row['recycled_ms']:>11.2f}  {row['recycled_over_tail']:>14.3f}  "
                  f"{row['loader_delivered_gbs']:>11.1f}  {row.get('copies_per_batch', '-'):>6}  "
                  f"{row.get('kernel_launches_per_batch', '-'):>7}")
        if "training" in r:
            t = r["training"]
            print(f"{r['model']} training: R / R on device = {t['R_over_on_device']} (<= 1.10); SR over "
                  f"{t['SR_epochs']} epochs = {t['SR_speedup']}x = {t['SR_of_theory']} of theory {t['theoretical']}")
    if "process" in args.producers:
        print("(store* : Loader(producer='process'))")
    print(f"pinned host-to-device copy bandwidth: {h2d:.1f} GB/s; total {time.perf_counter() - t0:.0f} s")
    if args.smoke_cpu:
        return  # a check of the script, not a measurement
    record("gpu", {"settings": {"batch_sizes": args.batch_sizes, "tokens": L, "batches": args.batches, "producers": args.producers,
                                "stores": args.stores, "epochs": args.epochs,
                                "erstore": str(Path(erstore.__file__).parent)},
                   "pinned_h2d_gbs": round(h2d, 2), "results": results})


if __name__ == "__main__":
    main()
