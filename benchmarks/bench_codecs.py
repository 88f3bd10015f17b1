"""Codec fidelity, size and speed on real text with the packaged MiniLM (issue: codecs).

One run: build a float32 store of MiniLM layer-3 states over stdlib paragraphs, then write the
same states through every codec into its own real store and read them back. For each codec:

- fidelity vs the float32 store: max / mean abs error of the tail's final hidden states
  (layers 3..5 via `consumers.load_tail`) and of a trained classifier's logits, argmax agreement;
- bytes per value on disk (codes, scales, index and metadata included), ratio to the paper's fp16
  (2 bytes per value, padded, uncompressed);
- encode and decode GB/s (of float32 activations, in memory, one thread; decode ends in float32,
  as the reader delivers) and delivered reader
  throughput (GB/s of decoded activations from `store.read` in batches of 64, page cache warm);
- decoding with torch (`erstore.torchcodecs`, what `Loader(decode_on_device=True)` runs on a GPU),
  here on the CPU, and the bytes per value that such a loader copies to the device (codes and
  scales, vs 4 for float32 states).

The classifier: which of the `--classes` most frequent stdlib packages a paragraph comes from
(default 8, in the first 4000 paragraphs), a linear layer on mean-pooled final
states, trained on the float32 states (a seeded random 80% of the labelled paragraphs). Agreement is
measured on every sequence of the store (most are from other packages: near-ties) and on the
labelled paragraphs only.

Run: HF_HUB_OFFLINE=1 python benchmarks/bench_codecs.py [--limit 4000] [--classes 8] [--codec TEXT ...]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's consumers/
from common import machine, record  # noqa: E402

import erstore  # noqa: E402
from consumers import load_tail  # noqa: E402
from erstore import torchcodecs  # noqa: E402
from erstore.builder import BuildConfig, build  # noqa: E402
from erstore.codecs import EntropyCodec, Int4Codec, Int8Codec, LosslessCodec, parse_codec  # noqa: E402
from erstore.corpus import default_corpus  # noqa: E402
from erstore.manifest import Recipe  # noqa: E402
from erstore.writer import StoreWriter  # noqa: E402

CODECS = [
    LosslessCodec("float32"), LosslessCodec("float16"), LosslessCodec("bfloat16"),
    LosslessCodec("float16", shuffle=True), LosslessCodec("bfloat16", shuffle=True),
    Int8Codec("token"), Int8Codec("channel"), Int8Codec("both"),
    Int4Codec(32, rotate=False), Int4Codec(16), Int4Codec(32), Int4Codec(64),
    EntropyCodec(0.15), EntropyCodec(0.2), EntropyCodec(0.25), EntropyCodec(0.3),
    EntropyCodec(0.15, pca=True), EntropyCodec(0.2, pca=True),
]


def label(codec) -> str:
    d = codec.to_dict()
    return d["name"] + ":" + ",".join(f"{k}={v}" for k, v in sorted(d.items()) if k not in ("name", "zstd_level"))


def tail_outputs(tail, entries, batch=32):
    """Final hidden states per sequence (unpadded, equal-length batches) and mean-pooled vectors."""
    finals, pooled = [None] * len(entries), torch.zeros(len(entries), tail.hidden_size)
    order = sorted(range(len(entries)), key=lambda i: len(entries[i].token_ids))
    with torch.inference_mode():
        for _, group in __import__("itertools").groupby(order, key=lambda i: len(entries[i].token_ids)):
            group = list(group)
            for s in range(0, len(group), batch):
                idx = group[s : s + batch]
                h = torch.from_numpy(np.stack([np.asarray(entries[i].states, dtype=np.float32) for i in idx]))
                out = tail(h, torch.ones(h.shape[:2], dtype=torch.long))
                for j, i in enumerate(idx):
                    finals[i] = out[j]
                    pooled[i] = out[j].mean(0)
    return finals, pooled


def train_head(x, y, classes, epochs=1000):
    """Linear classifier on mean-pooled final states."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--codec", action="append", help="only these codecs (`--codec` text, repeatable)")
    args = ap.parse_args()
    codecs = [parse_codec(text) for text in args.codec] if args.codec else CODECS
    print(machine())
    docs = default_corpus(args.limit)
    packages = [d.id.split("/")[0].split(".py")[0] for d in docs]
    top = [p for p, _ in collections.Counter(packages).most_common(args.classes)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(BuildConfig(limit=args.limit, store=str(tmp / "f32"), dtype="float32", progress=False, max_length=128))
        ref_store = erstore.open(tmp / "f32")
        keys = list(ref_store)
        ref = ref_store.read(keys)
        doc_key = {d.id: ref_store.windows(d.id)[0] for d in docs}
        key_pos = {k: i for i, k in enumerate(keys)}
        labelled = [(key_pos[doc_key[d.id]], top.index(p)) for d, p in zip(docs, packages) if p in top]
        # The corpus comes package by package: split at random, or the held-out part is one class.
        labelled = [labelled[i] for i in np.random.default_rng(0).permutation(len(labelled))]
        tail = load_tail(ref_store)
        ref_final, ref_pooled = tail_outputs(tail, ref)
        idx = torch.tensor([i for i, _ in labelled])
        y = torch.tensor([c for _, c in labelled])
        cut = int(0.8 * len(idx))
        head = train_head(ref_pooled[idx[:cut]], y[:cut], len(top))
        with torch.no_grad():
            ref_logits = head(ref_pooled)
            accuracy = float((ref_logits[idx[cut:]].argmax(1) == y[cut:]).float().mean())
        print(f"\nclassifier: {len(top)} classes {top}, {len(idx)} labelled, held-out accuracy {accuracy:.3f}")
        all_states = np.concatenate([np.asarray(e.states, dtype=np.float32) for e in ref])
        values = all_states.size
        rows = []
        for codec in codecs:
            r = ref_store.recipe
            recipe = Recipe(**{**r.to_dict(), "codec": codec.to_dict()})
            path = tmp / label(codec).replace(":", "_").replace(",", "_").replace("=", "")
            t0 = time.perf_counter()
            with StoreWriter(path, recipe) as w:
                for e in ref:
                    w.append(e.key, np.asarray(e.states, dtype=np.float32), e.token_ids, boundary=e.boundary)
                manifest = w.commit()
            write_s = time.perf_counter() - t0
            store = erstore.open(path)
            total_bytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            params = codec.fit(all_states[: 20000])
            t0 = time.perf_counter()
            parts = codec.encode(all_states, params)
            enc_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            decoded = np.asarray(codec.decode(parts, params), dtype=np.float32)  # what the reader hands on
            dec_s = time.perf_counter() - t0
            tensors = {n: torchcodecs.as_tensor(p) for n, p in parts.items()}
            t0 = time.perf_counter()
            torchcodecs.decode(codec, tensors, params)
            torch_dec_s = time.perf_counter() - t0
            copy_bytes = sum(p.nbytes for p in parts.values()) / values
            # float32 in and out is a view, not work: report no speed rather than a huge one
            no_op = np.shares_memory(decoded, all_states)
            t0 = time.perf_counter()
            got = []
            for s in range(0, len(keys), 64):
                got.extend(store.read(keys[s : s + 64]))
            read_s = time.perf_counter() - t0
            final, pooled = tail_outputs(tail, got)
            diffs = [float((a - b).abs().max()) for a, b in zip(final, ref_final)]
            mean_diff = float(np.mean([float((a - b).abs().mean()) for a, b in zip(final, ref_final)]))
            with torch.no_grad():
                logits = head(pooled)
            agree = float((logits.argmax(1) == ref_logits.argmax(1)).float().mean())
            agree_labelled = float((logits[idx].argmax(1) == ref_logits[idx].argmax(1)).float().mean())
            row = {"codec": label(codec), "bytes_per_value": round(total_bytes / values, 4),
                   "vs_paper_fp16": round(2.0 / (total_bytes / values), 2),
                   "final_max_abs": max(diffs), "final_mean_abs": mean_diff,
                   "logits_max_abs": float((logits - ref_logits).abs().max()), "argmax_agreement": agree, "argmax_agreement_labelled": agree_labelled,
                   "encode_GBps": None if no_op else round(values * 4 / enc_s / 1e9, 2),
                   "decode_GBps": None if no_op else round(values * 4 / dec_s / 1e9, 2),
                   "torch_decode_GBps": None if no_op else round(values * 4 / torch_dec_s / 1e9, 2),
                   "device_copy_bytes_per_value": round(copy_bytes, 3),
                   "reader_GBps": round(values * 4 / read_s / 1e9, 3), "store_write_s": round(write_s, 2),
                   "stored_bytes": total_bytes, "sequences": manifest.totals.sequences}
            rows.append(row)
            print(row)
    print(f"\n{'codec':28} {'B/value':>8} {'x fp16':>7} {'final max':>10} {'final mean':>10} {'logit max':>9} "
          f"{'agree':>7} {'agree lab':>9} {'enc GB/s':>8} {'dec GB/s':>8} {'torch dec':>9} {'copy B/v':>8} {'read GB/s':>9}")
    for r in rows:
        print(f"{r['codec']:28} {r['bytes_per_value']:>8} {r['vs_paper_fp16']:>7} {r['final_max_abs']:>10.2e} "
              f"{r['final_mean_abs']:>10.2e} {r['logits_max_abs']:>9.2e} {r['argmax_agreement']:>7.4f} "
              f"{r['argmax_agreement_labelled']:>9.4f} {r['encode_GBps'] or 'no-op':>8} {r['decode_GBps'] or 'no-op':>8} "
              f"{r['torch_decode_GBps'] or 'no-op':>9} {r['device_copy_bytes_per_value']:>8} {r['reader_GBps']:>9}")
    print(f"{values} values ({values // 384} tokens x 384) in {len(keys)} sequences; classifier: {len(top)} classes, "
          f"{len(idx)} labelled paragraphs, held-out accuracy {accuracy:.3f}")
    record("codecs", {"limit": args.limit, "values": values, "classifier": {"classes": top, "accuracy": accuracy},
                      "rows": rows})


if __name__ == "__main__":
    main()
