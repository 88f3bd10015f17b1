"""Recycled vs full training and inference for a decoder-only model (Llama shape), side by side.

    python benchmarks/bench_decoder.py [--layers 8] [--layer 4] [--hidden 384] [--batches 3]

Model: a LlamaConfig with random weights (speed does not depend on the weights): --layers
decoder layers of --hidden, grouped-query attention (heads/2 key-value heads), SwiGLU MLP of
8/3 x hidden, and a byte-level BPE tokenizer of 4096 tokens trained here on stdlib docstrings
(a small vocabulary keeps the LM head's share of the compute near that of 1-3B models; with
MiniLM's 30k vocabulary a tiny model would mostly time its LM head). Store at --layer (fp16).
Batches are B windows of exactly L tokens.

Inference, ms per batch (inference_mode):
  full       LlamaForCausalLM on the token ids -> logits
  recycled   fp16 store through the prefetching Loader -> layers k..N-1 + norm + LM head
Training, ms per step (AdamW):
  NR-lm      full causal-LM fine-tune of every parameter on the token ids
  R-lm       ReducedModel(task="causal-lm") on the store: layers k..N-1 + LM head, loss on the
             stored token ids
  NR-cls     full LlamaForSequenceClassification fine-tune (last-token pooling, random labels)
  R-cls      ReducedModel(task="sequence") on the store (same head)
Each speedup is also given as a fraction of N/(N-k), which ignores the LM head (it runs in
both), and for the causal-LM rows of a bound that counts it (matmul parameters per token);
recycled_compute_only_ms is the tail + LM head on batches already in memory. The settings run
interleaved (one batch of each in turn) so they share the machine's load; times are the best of
--batches timed batches after one warm-up, with 1 torch thread by default. Appends one JSON
line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_consumers import corpus  # noqa: E402
from common import record  # noqa: E402

import erstore  # noqa: E402

VOCAB = 4096


def interleaved(fns: dict, n: int, warmup: int = 1) -> dict[str, float]:
    """Best ms of each fn(i), the fns called in turn for i = 0..warmup+n-1 (first `warmup` untimed).

    Interleaving puts every side under the same load from other processes; the minimum is what
    timeit reports, since interference only adds time.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: round(min(ts), 1) for name, ts in times.items()}


def decoder_model(folder: Path, *, layers: int, hidden: int) -> str:
    """A random LlamaForCausalLM and a byte-level BPE tokenizer (BOS added, as Llama's), saved once."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    from erstore.corpus import default_corpus

    if (folder / "config.json").exists():
        return str(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.text for p in default_corpus(2000)], trainer=trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                               model_max_length=2048).save_pretrained(folder)
    heads = max(1, hidden // 64)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                            intermediate_size=int(hidden * 8 / 3) // 64 * 64, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, max_position_embeddings=2048)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "erstore-bench-decoder"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from consumers import ReducedModel
    from consumers.train import make_optimizer, step

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    B, L, nb, k = args.batch, args.length, args.batches, args.layer
    root = Path(args.workdir) / f"llama-{args.layers}x{args.hidden}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = decoder_model(root / "model", layers=args.layers, hidden=args.hidden)
    path = root / f"f16-l{k}-{L}"
    if not (path / "erstore.json").exists():
        erstore.build(model=model, layers=(k,), corpus=str(corpus(root, (nb + 1) * B * 4)), store=str(path),
                      dtype="float16", max_length=L, progress=False)
    store = erstore.open(str(path))
    entries = [e for e in store.read(sorted(store)) if len(e.token_ids) == L][: (nb + 1) * B]
    if len(entries) < (nb + 1) * B:
        raise SystemExit(f"only {len(entries)} full {L}-token windows; raise the corpus size")
    keys = [e.key for e in entries]
    print(f"store ready ({time.perf_counter() - t0:.0f} s): {len(keys)} windows of {L} tokens")
    ids = [torch.tensor(np.stack([e.token_ids for e in entries[i * B : (i + 1) * B]]).astype(np.int64))
           for i in range(nb + 1)]
    mask = torch.ones(B, L, dtype=torch.long)
    labels = {e.key: int(e.token_ids[1]) % 4 for e in entries}
    label_batches = [torch.tensor([labels[key] for key in keys[i * B : (i + 1) * B]]) for i in range(nb + 1)]
    theory = args.layers / (args.layers - k)
    out: dict = {"model": f"llama {args.layers}x{args.hidden} gqa, vocab {VOCAB}", "layer": k,
                 "num_layers": args.layers, "batch": [B, L], "batches": nb, "theoretical": round(theory, 3)}

    # -- inference ------------------------------------------------------------------------------
    full = AutoModelForCausalLM.from_pretrained(model).eval()
    reduced = ReducedModel.for_store(store, task="causal-lm").eval()
    # The LM head runs in both, so N/(N-k) is not reachable; this bound counts it (matmul
    # parameters per token; attention scores, norms and rotary are left out: small at L=128).
    per_layer = sum(p.numel() for p in full.model.layers[0].parameters() if p.dim() == 2)
    head = full.lm_head.weight.numel()
    bound = (args.layers * per_layer + head) / ((args.layers - k) * per_layer + head)
    out["bound_with_lm_head"] = round(bound, 3)
    states = [torch.from_numpy(np.stack([e.states for e in entries[i * B : (i + 1) * B]]).astype(np.float32))
              for i in range(nb + 1)]
    with torch.inference_mode(), store.loader(keys, batch_size=B, prefetch=2) as batches:
        it = iter(batches)

        def recycled(i, reduced=reduced):
            batch = next(it)
            return reduced(batch["hidden_states"], batch["attention_mask"]).logits

        ms = interleaved({"full": lambda i, full=full: full(input_ids=ids[i], attention_mask=mask).logits,
                          "recycled": recycled,
                          "compute_only": lambda i, reduced=reduced: reduced(states[i], mask).logits}, nb)
    out["inference"] = {"full_ms": ms["full"], "recycled_ms": ms["recycled"],
                        "recycled_compute_only_ms": ms["compute_only"],
                        "speedup": round(ms["full"] / ms["recycled"], 3),
                        "of_theory": round(ms["full"] / ms["recycled"] / theory, 3),
                        "of_bound_with_lm_head": round(ms["full"] / ms["recycled"] / bound, 3)}
    print("inference:", json.dumps(out["inference"]))
    del full, reduced

    # -- training -------------------------------------------------------------------------------
    torch.manual_seed(0)
    nets = {"NR-lm": AutoModelForCausalLM.from_pretrained(model).train(),
            "NR-cls": AutoModelForSequenceClassification.from_pretrained(model, num_labels=4).train(),
            "R-lm": ReducedModel.for_store(store, task="causal-lm").train(),
            "R-cls": ReducedModel.for_store(store, task="sequence", num_labels=4).train()}
    opts = {name: make_optimizer(net, lr=2e-5) for name, net in nets.items()}
    with store.loader(keys, batch_size=B, prefetch=2) as lm_feed, \
            store.loader(keys, labels=labels, batch_size=B, prefetch=2) as cls_feed:
        feeds = {"R-lm": iter(lm_feed), "R-cls": iter(cls_feed)}

        def full_step(name):
            def run(i):
                target = ids[i] if name == "NR-lm" else label_batches[i]
                return step(nets[name], opts[name], {"input_ids": ids[i], "attention_mask": mask, "labels": target})
            return run

        def recycled_step(name):
            return lambda i: step(nets[name], opts[name], next(feeds[name]))

        ms = interleaved({"NR-lm": full_step("NR-lm"), "R-lm": recycled_step("R-lm"),
                          "NR-cls": full_step("NR-cls"), "R-cls": recycled_step("R-cls")}, nb)
    training: dict = {f"{name}_ms": value for name, value in ms.items()}
    for task in ("lm", "cls"):
        sp = ms[f"NR-{task}"] / ms[f"R-{task}"]
        training[f"R-{task}_speedup"], training[f"R-{task}_of_theory"] = round(sp, 3), round(sp / theory, 3)
    training["R-lm_of_bound_with_lm_head"] = round(ms["NR-lm"] / ms["R-lm"] / bound, 3)
    out["training"] = training
    print("training:", json.dumps(training))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    record("decoder", {"results": out, "threads": args.threads})


if __name__ == "__main__":
    main()
