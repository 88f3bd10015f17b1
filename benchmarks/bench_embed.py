"""Sentence embeddings: a reduced MiniLM on stored layer-3 states vs sentence-transformers' encode.

Builds one store per dtype (float32, float16, bfloat16) of the packaged all-MiniLM-L6-v2 at
layer 3 over the first N default-corpus paragraphs (default options: windows of the model's
max_seq_length, 256), then embeds the same paragraphs with `SentenceTransformer.encode` (the
whole model on token ids) and with `ReducedModel.encode` (layers 3..5 on stored states, mean
pooling, normalised) side by side, and reports per dtype: min / mean cosine and max abs
difference against sentence-transformers, and the time of each encode (model loading and the
build outside the timings).

    HF_HUB_OFFLINE=1 python benchmarks/bench_embed.py --docs 400
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import record
import erstore
from consumers import ReducedModel
from erstore.builder import BuildConfig, build
from erstore.corpus import default_corpus
from erstore.tokenize import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    texts = [d.text for d in default_corpus(args.docs)]
    st = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    st.encode(texts[:8])  # warm-up
    t = time.perf_counter()
    ref = st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    st_s = time.perf_counter() - t
    print(f"sentence-transformers encode: {st_s:.2f} s for {len(texts)} texts")
    results = {"docs": len(texts), "batch_size": args.batch_size, "sentence_transformers_s": round(st_s, 3),
               "dtypes": {}}
    model = None
    with tempfile.TemporaryDirectory() as tmp:
        corpus = [{"text": x} for x in texts]
        for dtype in ("float32", "float16", "bfloat16"):
            [r] = build(BuildConfig(corpus=corpus, store=f"{tmp}/{dtype}", dtype=dtype, layers=(3,),
                                    progress=False))
            with erstore.open(r.store) as store:
                if model is None:
                    model = ReducedModel.for_store(store, task="embedding")
                    model.encode(texts[:8], store=store)  # warm-up
                t = time.perf_counter()
                ours = model.encode(texts, store=store, batch_size=args.batch_size)
                seconds = time.perf_counter() - t
                max_length = store.recipe.max_length
            cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
            row = {"min_cosine": float(cos.min()), "one_minus_min_cosine": float(1 - cos.min()),
                   "mean_cosine": float(cos.mean()), "max_abs_diff": float(np.abs(ours - ref).max()),
                   "reduced_encode_s": round(seconds, 3), "full_over_reduced": round(st_s / seconds, 2),
                   "store_max_length": max_length, "computed_misses": model._extractor is not None}
            results["dtypes"][dtype] = row
            print(f"{dtype:9s} 1-min cos {row['one_minus_min_cosine']:.2e}  max abs diff {row['max_abs_diff']:.2e}  "
                  f"reduced encode {seconds:.2f} s  (sentence-transformers / reduced = {row['full_over_reduced']})")
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    record("embed", results)


if __name__ == "__main__":
    main()
