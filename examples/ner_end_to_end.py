"""Word-level NER end to end: build from words, label, train full and reduced, entity F1, predict.

    HF_HUB_OFFLINE=1 python examples/ner_end_to_end.py            # ~3-5 min on 2 CPU cores
    python examples/ner_end_to_end.py --seeds 0,1,2 --epochs 20    # more seeds, longer training

The data is `examples/data/ner_sentences.txt`: 209 short English sentences, hand-written and
hand-labelled for this example with CoNLL-2003 entity types (PER, ORG, LOC, MISC) in IOB2 tags.
Every fifth sentence is held out for testing (42 sentences, 86 entities); the rest train.

1. `erstore.build(words_field="tokens")`: layer 3 of the packaged all-MiniLM-L6-v2 over the
   pre-tokenized sentences (tokenized with `is_split_into_words`, as transformers' NER examples).
2. `erstore.labels.token_examples`: one example per sentence; the first sub-token of each word
   carries its tag.
3. `consumers.train` trains a `ReducedModel` (layers 3..5 + head, on stored states) and the full
   fine-tuning baseline `FullModel` (all 6 layers, on the stored token ids) with the same loop,
   loss, optimizer, epochs, batch size and seed.
4. Scores: entity F1 as seqeval computes it, over one predicted tag per word of the test
   sentences (`predict_words`), for each seed; then tags two new sentences word by word.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import erstore
from consumers import FullModel, ReducedModel, train
from consumers.metrics import entity_f1
from erstore.labels import token_examples

DATA = Path(__file__).resolve().parent / "data" / "ner_sentences.txt"
TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
NEW = ["Marie Curie gave a lecture at Oxford University in England .",
       "Siemens and Bosch opened offices in Warsaw ."]


def parse(line: str) -> dict:
    """'[PER Marie Curie] was born in [LOC Warsaw] .' -> tokens and IOB2 tags."""
    tokens, tags = [], []
    for m in re.finditer(r"\[(PER|ORG|LOC|MISC) ([^\]]+)\]|(\S+)", line):
        if m.group(3):
            tokens.append(m.group(3))
            tags.append("O")
        else:
            words = m.group(2).split()
            tokens += words
            tags += [f"B-{m.group(1)}"] + [f"I-{m.group(1)}"] * (len(words) - 1)
    return {"tokens": tokens, "ner_tags": tags}


def load() -> tuple[list[dict], list[dict]]:
    lines = [ln.strip() for ln in DATA.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    rows = [{"id": f"s{i}", **parse(ln)} for i, ln in enumerate(lines)]
    return [r for i, r in enumerate(rows) if i % 5], [r for i, r in enumerate(rows) if i % 5 == 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="erstore-ner-"))
    work.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = load()
    corpus = work / "sentences.jsonl"
    corpus.write_text("".join(json.dumps({"id": r["id"], "tokens": r["tokens"]}) + "\n"
                              for r in train_rows + test_rows))
    start = time.perf_counter()
    (result,) = erstore.build(corpus=str(corpus), words_field="tokens", id_field="id", layers=(args.layer,),
                              store=str(work / f"minilm-l{args.layer}"), progress=False)
    print(f"data: {len(train_rows)} train / {len(test_rows)} test sentences, "
          f"{sum(t.startswith('B-') for r in test_rows for t in r['ner_tags'])} test entities")
    print(f"build: {result.summary()} ({time.perf_counter() - start:.1f} s)")
    store = erstore.open(result.store)
    label_to_id = {t: i for i, t in enumerate(TAGS)}
    examples = token_examples(store, train_rows, label_to_id=label_to_id)
    gold = [r["ner_tags"] for r in test_rows]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results: dict[str, dict[str, list[float]]] = {"reduced": {"f1": [], "s": []}, "full": {"f1": [], "s": []}}
    models = {}
    for seed in seeds:
        for name in ("reduced", "full"):
            torch.manual_seed(seed)
            make = ReducedModel if name == "reduced" else FullModel
            model = make.for_store(store, task="token", num_labels=len(TAGS))
            t0 = time.perf_counter()
            train(model, store, examples, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed)
            seconds = time.perf_counter() - t0
            pred = model.predict_words([r["tokens"] for r in test_rows], store=store, label_names=TAGS)
            results[name]["f1"].append(entity_f1(gold, pred))
            results[name]["s"].append(seconds)
            models[name] = model
            print(f"seed {seed} {name:<7}: entity F1 {results[name]['f1'][-1]:.1f}, train {seconds:.1f} s")

    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    speed = np.mean(results["full"]["s"]) / np.mean(results["reduced"]["s"])
    steps = args.epochs * -(-len(examples) // args.batch_size)
    print(f"\n{args.epochs} epochs ({steps} steps), batch {args.batch_size}, lr {args.lr:g}, seeds {seeds}\n")
    print("| model | layers trained | test entity F1 (seqeval, mean ± sd over seeds) | train s | speedup |")
    print("|---|---|---|---|---|")
    n = store.recipe.num_layers
    print(f"| full fine-tuning | 0..{n - 1} | {cell(results['full']['f1'])} | {cell(results['full']['s'])} | 1.00x |")
    print(f"| reduced (recycled k={args.layer}) | {args.layer}..{n - 1} | {cell(results['reduced']['f1'])} | "
          f"{cell(results['reduced']['s'])} | {speed:.2f}x |")
    print("\nnew text (last seed), one tag per word:")
    for name, model in models.items():
        for words, tags in zip(NEW, model.predict_words(NEW, store=store, label_names=TAGS)):
            print(f"  {name:<7} " + " ".join(w if t == "O" else f"{w}/{t}" for w, t in zip(words.split(), tags)))


if __name__ == "__main__":
    main()
