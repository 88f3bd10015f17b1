"""Recycling speedups on this machine (the paper's Tables 4 and 5), measured side by side in one run.

    python benchmarks/bench_consumers.py [--models minilm,base] [--batches 4] [--base-batches 3]

Models: the packaged MiniLM (L6-H384, store at layer 3) and a BERT-base-sized model with random
weights (12 layers, hidden 768, store at layer 6; speed does not depend on the weights).
Batches are 32 windows of exactly 128 tokens (stdlib docstrings, windowed at max_length 128).

Inference, ms per batch:
  full       the whole transformers model on the batch's token ids (inference_mode)
  recycled   reading the batch from the store (fp32 / fp16 / bf16) + layers k..N-1; with the
             Loader's prefetch thread (prefetch=2) and without (read + collate, then compute)
Training, ms per step (AdamW, sequence-classification head, random labels):
  NR  no recycling: full fine-tune of all layers
  F   lower k layers frozen (forward through all layers, backward through the top N-k)
  SR  save-and-recycle over --epochs epochs (epoch 1 computes layers 0..k and writes the fp16
      store, later epochs read it), total time / (epochs x batches): amortised
  R   recycle only: the fp16 store read by the prefetching Loader, layers k..N-1 trained
Each speedup is also given as a fraction of the theoretical N/(N-k). Times are the best of the
timed batches (after one untimed warm-up), with 1 torch thread by default (see
benchmarks/README_consumers.md for why). Appends one JSON line to benchmarks/results.jsonl.
Shorter runs: --models minilm, --training-only, --settings NR,R (or none).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
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

B, L = 32, 128


def base_model(folder: Path, **config: Any) -> str:
    """A BERT model with random weights (BERT-base unless `config` overrides BertConfig fields)
    and MiniLM's (BERT uncased) tokenizer, saved once."""
    import shutil

    import torch
    import transformers as tf

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        tf.BertModel(tf.BertConfig(**config)).save_pretrained(folder)  # default 12 x 768, 30522 vocab
        from erstore.tokenize import resolve_model

        src = Path(resolve_model("all-MiniLM-L6-v2"))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (src / name).exists():
                shutil.copy(src / name, folder / name)
    return str(folder)


def corpus(folder: Path, windows: int) -> Path:
    """Documents of ~12 joined docstring paragraphs: most 128-token windows are full."""
    from erstore.corpus import default_corpus

    paragraphs = default_corpus(max(200, windows * 4))
    docs = [" ".join(p.text for p in paragraphs[i : i + 12]) for i in range(0, len(paragraphs), 12)]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(docs)))
    return path


def copy_store(src: erstore.Store, dst: Path, dtype: str) -> erstore.Store:
    """The same windows in another dtype (no recompute): decode fp32 rows, re-encode."""
    from erstore.codecs import parse_codec
    from erstore.writer import StoreWriter

    if not (dst / "erstore.json").exists():
        recipe = dataclasses.replace(src.recipe, codec=parse_codec("lossless", dtype=dtype).to_dict())
        with StoreWriter(str(dst), recipe) as w:
            for e in src.read(list(src)):
                w.append(e.key, e.states, e.token_ids, boundary=e.boundary)
            w.commit(build={"source": "bench_consumers copy"})
    return erstore.open(str(dst))


def per_batch(fn, n: int, warmup: int = 1) -> float:
    """Best ms of fn(i) over i = warmup..warmup+n-1 (the first `warmup` calls are not timed).

    The minimum, as timeit reports: on a shared machine other processes only ever add time.
    """
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        fn(i)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def step_times(stamps: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def bench_model(name: str, model: str, layer: int, nb: int, epochs: int, work: Path, *,
                inference_too: bool = True, settings: tuple[str, ...] = ("NR", "F", "SR", "R")) -> dict:
    import torch

    from consumers import ReducedModel, SequenceClassificationHead, load_tail
    from consumers.recycle import SaveAndRecycle
    from consumers.train import make_optimizer, step
    from erstore.model import LayerExtractor
    from erstore.torchdata import Collate

    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp32_path = root / "fp32"
    if not (fp32_path / "erstore.json").exists():
        erstore.build(model=model, layers=(layer,), corpus=str(corpus(root, (nb + 1) * B)), store=str(fp32_path),
                      dtype="float32", max_length=L, progress=False)
    full_store = erstore.open(str(fp32_path))
    keys = [e.key for e in full_store.read(list(full_store)) if len(e.token_ids) == L][: (nb + 1) * B]
    if len(keys) < (nb + 1) * B:
        raise SystemExit(f"{name}: only {len(keys)} full {L}-token windows; raise the corpus size")
    stores = {"float32": erstore.open(str(fp32_path))}
    for dtype in ("float16", "bfloat16"):
        stores[dtype] = copy_store(stores["float32"], root / dtype.replace("loat", ""), dtype)
    print(f"[{name}] stores ready ({time.perf_counter() - t0:.0f} s): {len(keys)} windows of {L} tokens")
    entries = {e.key: e for e in full_store.read(keys)}
    ids = [torch.tensor(np.stack([entries[k].token_ids for k in keys[i * B : (i + 1) * B]]).astype(np.int64))
           for i in range(nb + 1)]
    labels = {k: int(entries[k].token_ids[1]) % 4 for k in keys}
    out: dict = {"model": name, "layer": layer, "batches": nb, "batch": [B, L]}
    extractor = LayerExtractor(model)
    n_layers = extractor.num_layers
    out["num_layers"], theory = n_layers, n_layers / (n_layers - layer)
    out["theoretical"] = round(theory, 3)

    # -- inference ------------------------------------------------------------------------------
    full = extractor.model.eval()
    mask = torch.ones(B, L, dtype=torch.long)
    inference: dict = {}
    if inference_too:
        with torch.inference_mode():
            full_ms = per_batch(lambda i, full=full: full(input_ids=ids[i], attention_mask=mask), nb)
        tail = load_tail(full_store).eval()
        inference["full_ms"] = round(full_ms, 1)
    for dtype, store in (stores if inference_too else {}).items():
        ds = store.dataset(keys)
        collate = Collate()

        def sync(i, ds=ds, collate=collate):
            batch = collate(ds.__getitems__(range(i * B, (i + 1) * B)))
            tail(batch["hidden_states"], batch["attention_mask"])

        with torch.inference_mode():
            tail(torch.zeros(B, L, tail.hidden_size), mask)  # warm the tail's kernels
            sync_ms = per_batch(sync, nb)
            with store.loader(keys, batch_size=B, prefetch=2) as loader:
                stamps = []
                for batch in loader:  # per batch: waiting for the next batch + compute
                    stamps.append(time.perf_counter())
                    tail(batch["hidden_states"], batch["attention_mask"])
                stamps.append(time.perf_counter())
                pre_ms = min(step_times(stamps)[1:])  # the first includes starting the thread
        for mode, ms in (("prefetch", pre_ms), ("no_prefetch", sync_ms)):
            inference[f"{dtype}_{mode}_ms"] = round(ms, 1)
            inference[f"{dtype}_{mode}_speedup"] = round(full_ms / ms, 3)
            inference[f"{dtype}_{mode}_of_theory"] = round(full_ms / ms / theory, 3)
    if inference_too:
        out["inference"] = inference
        print(f"[{name}] inference: {json.dumps(inference)}")
        del tail

    # -- training -------------------------------------------------------------------------------
    class Full(torch.nn.Module):
        def __init__(self, body, frozen: int):
            super().__init__()
            self.body = body
            self.head = SequenceClassificationHead(body.config.hidden_size, 4)
            if frozen:
                for p in body.embeddings.parameters():
                    p.requires_grad_(False)
                for block in body.encoder.layer[:frozen]:
                    for p in block.parameters():
                        p.requires_grad_(False)

        def forward(self, input_ids, attention_mask, labels):
            h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return {"loss": torch.nn.functional.cross_entropy(self.head(h), labels)}

    del full, extractor  # free the inference copy before training copies are made
    if "NR" not in settings:  # NR is every training row's baseline: no NR, no training table
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out
    label_batches = [torch.tensor([labels[k] for k in keys[i * B : (i + 1) * B]]) for i in range(nb + 1)]
    training = {}
    for setting, frozen in (("NR", 0), ("F", layer)):
        if setting not in settings:
            continue
        torch.manual_seed(0)
        net = Full(LayerExtractor(model).model, frozen).train()
        opt = make_optimizer(net, lr=2e-5)
        training[f"{setting}_ms"] = round(per_batch(
            lambda i, net=net, opt=opt: step(net, opt, {"input_ids": ids[i], "attention_mask": mask, "labels": label_batches[i]}), nb), 1)
        del net, opt
    fp16 = erstore.open(str(root / "f16"))
    reduced = ReducedModel.for_store(fp16, task="sequence", num_labels=4).train()
    opt = make_optimizer(reduced, lr=2e-5)
    with fp16.loader(keys, labels=labels, batch_size=B, prefetch=2) as loader:
        it = iter(loader)
        training["R_ms"] = round(per_batch(lambda i: step(reduced, opt, next(it)), nb), 1)
    sr_model = ReducedModel.for_store(fp16, task="sequence", num_labels=4)
    sr_path = root / f"sr-{time.time_ns()}"
    sr = SaveAndRecycle(sr_model, str(sr_path), batch_size=B)
    examples = [(k, entries[k].token_ids.tolist(), 0, labels[k]) for k in keys[B:]]
    sr_model._extractor_for(fp16.recipe)  # load the extractor outside the timing, as NR loads its model
    stamps: dict[int, list[float]] = {}
    t1 = time.perf_counter()
    report = sr.fit_examples(examples, epochs=epochs, lr=2e-5,
                             on_batch=lambda e, b: stamps.setdefault(e, []).append(time.perf_counter()))
    sr_total = time.perf_counter() - t1
    # Best-of per phase, like the other rows: epoch-1 steps (compute 0..k + write + train) and
    # later steps (read + train); the commit and the Loader start-up are in SR_total_ms only.
    first = min(step_times(stamps[0]) or [report.epochs[0]["seconds"] * 1e3 / nb])
    if epochs == 1:
        later = first
    elif nb > 1:
        later = min(t for e in range(1, epochs) for t in step_times(stamps[e]))
    else:  # one batch per epoch: the whole epoch (includes starting the Loader)
        later = min(e["seconds"] for e in report.epochs[1:]) * 1e3
    training["SR_ms"] = round((first + (epochs - 1) * later) / epochs, 1)
    training["SR_total_ms"] = round(sr_total * 1e3 / (epochs * nb), 1)
    training["SR_epoch1_ms"] = round(report.epochs[0]["seconds"] * 1e3 / nb, 1)
    training["SR_later_epoch_ms"] = round(statistics.median(e["seconds"] for e in report.epochs[1:]) * 1e3 / nb, 1) \
        if epochs > 1 else None
    training["SR_epochs"] = epochs
    training["SR_total_speedup"] = round(training["NR_ms"] / training["SR_total_ms"], 3)
    for setting in [s for s in ("F", "SR", "R") if s in settings]:
        sp = training["NR_ms"] / training[f"{setting}_ms"]
        training[f"{setting}_speedup"] = round(sp, 3)
        training[f"{setting}_of_theory"] = round(sp / theory, 3)
    out["training"] = training
    print(f"[{name}] training: {json.dumps(training)}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,base")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per setting (MiniLM)")
    ap.add_argument("--base-batches", type=int, default=3, help="timed batches per setting (base)")
    ap.add_argument("--epochs", type=int, default=6, help="SR epochs to amortise over")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared machine, OpenMP barriers stall when another "
                         "process holds a core)")
    ap.add_argument("--training-only", action="store_true", help="skip the inference table")
    ap.add_argument("--settings", default="NR,F,SR,R", help="training settings to run; NR is the baseline, 'none' skips training")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "erstore-bench-consumers"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {json.dumps(info)}")
    print(f"settings: batch {B} x {L} tokens, SR epochs {args.epochs}, torch threads {args.threads}, "
          f"workdir {work}")
    specs = {"minilm": ("all-MiniLM-L6-v2", 3, args.batches),
             "base": (None, 6, args.base_batches)}
    results = []
    for name in args.models.split(","):
        model, layer, nb = specs[name]
        model = model or base_model(work / "bert-base-random")
        results.append(bench_model(name, model, layer, nb, args.epochs, work, inference_too=not args.training_only,
                                   settings=tuple(args.settings.split(","))))
    record("consumers", {"settings": {"batch": [B, L], "epochs": args.epochs, "threads": args.threads},
                         "results": results})


if __name__ == "__main__":
    main()
