"""End to end: build a store, fine-tune a reduced classifier and a reduced NER tagger, compare with
full fine-tuning of the same model on the same data, and predict on new text.

    HF_HUB_OFFLINE=1 python examples/recycle_classifier_and_ner.py            # ~3-6 min on 2 CPU cores
    python examples/recycle_classifier_and_ner.py --per-class 200 --epochs 4 --classes 6   # bigger

Everything is offline and seeded (figures still vary between runs and machines: see
examples/README.md). The labelled text is derived from the Python standard
library's docstrings (erstore's default corpus; document ids are "<file>:<n>"):

  classification  which package a docstring paragraph comes from (tkinter, email, asyncio, ...)
  NER             silver tags from fixed rules on each whitespace word (punctuation stripped):
                  NUMBER (digits), CODE (dotted/underscored/camelCase identifiers, calls like f()),
                  MODULE (a stdlib module name that is not also a common English word), else O

The store holds layer 3 of the packaged all-MiniLM-L6-v2 (6 layers). The reduced models train
layers 3..5 plus a head on stored states (the paper's "R" setting); the baselines fine-tune all
6 layers from token ids. Both read the same batches from one erstore Loader (same windows, same
order, same labels), so only the model differs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import erstore  # noqa: E402
from consumers import ReducedModel, train  # noqa: E402
from erstore.corpus import default_corpus  # noqa: E402
from erstore.labels import sequence_labels, token_labels  # noqa: E402

PACKAGES = ["tkinter", "email", "asyncio", "logging", "xml", "unittest"]
TAGS = ["O", "NUMBER", "CODE", "MODULE"]
ENGLISH = {"this", "string", "time", "code", "types", "token", "site", "select", "queue", "signal",
           "random", "array", "copy", "numbers", "test", "keyword", "operator", "parser", "symbol",
           "trace", "struct", "platform", "resource", "secrets", "statistics", "calendar", "wave",
           "glob", "locale", "inspect", "fractions", "decimal", "email", "sched", "shelve", "stat"}
NUMBER = re.compile(r"^[+-]?\d+(?:[.,]\d+)*%?$")
CODE = re.compile(r"^(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|_*[A-Za-z]\w*_\w*|[a-z]+[A-Z]\w*|[A-Za-z_][\w.]*\(\))$")


def tag(word: str) -> int:
    w = word.strip(".,;:!?\"'`()[]{}")
    if word.rstrip(".,;:!?\"'`").endswith("()") or CODE.match(w):
        return TAGS.index("CODE")
    if NUMBER.match(w):
        return TAGS.index("NUMBER")
    if w in sys.stdlib_module_names and w not in ENGLISH and len(w) > 2:
        return TAGS.index("MODULE")
    return 0


def dataset(classes: int, per_class: int, test_per_class: int):
    """(train, test) rows: {"id", "text", "label", "tokens", "ner_tags"}, balanced per package."""
    by_package = defaultdict(list)
    for doc in default_corpus(100_000):
        package = doc.id.split(":")[0].split("/")[0].removesuffix(".py")
        by_package[package].append(doc)
    train_rows, test_rows = [], []
    for label, package in enumerate(PACKAGES[:classes]):
        docs = sorted(by_package[package], key=lambda d: d.id)
        random.Random(label).shuffle(docs)
        if len(docs) < per_class + test_per_class:
            raise SystemExit(f"{package} has {len(docs)} paragraphs; lower --per-class/--test-per-class")
        for rows, part in ((train_rows, docs[:per_class]), (test_rows, docs[per_class : per_class + test_per_class])):
            for d in part:
                words = d.text.split()
                rows.append({"id": d.id, "text": d.text, "label": label, "tokens": words,
                             "ner_tags": [tag(w) for w in words]})
    return train_rows, test_rows


class FullModel(torch.nn.Module):
    """The baseline: transformers' full model fine-tuned on the loader's token ids."""

    def __init__(self, auto, num_labels: int):
        super().__init__()
        from transformers import logging
        from erstore.tokenize import resolve_model

        logging.set_verbosity_error()
        self.net = auto.from_pretrained(resolve_model("all-MiniLM-L6-v2"), num_labels=num_labels)

    def forward(self, input_ids, attention_mask, labels=None, **extras):
        return self.net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def run(model, store, labels, *, epochs: int, batch_size: int, lr: float, seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with store.loader(labels=labels, batch_size=batch_size, shuffle=True, seed=seed) as batches:
        losses = train(model, batches, epochs=epochs, lr=lr, seed=seed)
    return time.perf_counter() - t0, len(losses)


@torch.no_grad()
def evaluate(model, store, labels, token: bool) -> dict:
    model.eval()
    gold, pred = [], []
    with store.loader(labels=labels, batch_size=64) as batches:
        for batch in batches:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            y = batch["labels"]
            keep = y != -100
            gold.append(y[keep].numpy())
            pred.append(logits.argmax(-1)[keep].numpy())
    g, p = np.concatenate(gold), np.concatenate(pred)
    out = {"accuracy": float((g == p).mean()), "n": int(len(g))}
    if token:  # token-level micro F1 over the non-O tags (first sub-token of each word); the tags
        # are not BIO spans, so this is not seqeval's entity F1 (see examples/ner_end_to_end.py)
        tp = int(((p == g) & (g != 0)).sum())
        fp, fn = int(((p != 0) & (p != g)).sum()), int(((g != 0) & (p != g)).sum())
        out["tag_f1"] = 2 * tp / max(1, 2 * tp + fp + fn)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=4, choices=range(2, len(PACKAGES) + 1))
    ap.add_argument("--per-class", type=int, default=80, help="training paragraphs per package")
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "erstore-example"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    # 1. Labelled data and a store over all of its text (train and test).
    train_rows, test_rows = dataset(args.classes, args.per_class, args.test_per_class)
    corpus = work / "paragraphs.jsonl"
    corpus.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in train_rows + test_rows))
    t0 = time.perf_counter()
    [result] = erstore.build(layers=(3,), corpus=str(corpus), store=str(work / "minilm-l3"), id_field="id",
                             max_length=args.max_length, progress=False)
    build_s = time.perf_counter() - t0
    store = erstore.open(str(work / "minilm-l3"))
    tags = Counter(t for r in train_rows for t in r["ner_tags"])
    print(f"data: {len(train_rows)} train / {len(test_rows)} test paragraphs from {PACKAGES[:args.classes]}; "
          f"train word tags {({TAGS[k]: v for k, v in sorted(tags.items())})}")
    print(f"store: {result.summary()}")
    print(f"build: {build_s:.1f} s (layers 0..2 of MiniLM over {store.index.total_tokens} tokens)")

    cls_train = sequence_labels(store, train_rows, by="doc")
    cls_test = sequence_labels(store, test_rows, by="doc")
    ner_train = token_labels(store, train_rows)
    ner_test = token_labels(store, test_rows)
    opts = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    rows = []
    for task, (tr, te, n, auto) in {
        "classification": (cls_train, cls_test, args.classes, AutoModelForSequenceClassification),
        "ner": (ner_train, ner_test, len(TAGS), AutoModelForTokenClassification),
    }.items():
        token = task == "ner"
        reduced = ReducedModel.for_store(store, task="token" if token else "sequence", num_labels=n)
        r_s, steps = run(reduced, store, tr, **opts)
        r_eval = evaluate(reduced, store, te, token)
        full = FullModel(auto, n)
        f_s, _ = run(full, store, tr, **opts)
        f_eval = evaluate(full, store, te, token)
        rows.append((task, steps, r_s, f_s, r_eval, f_eval))
        print(f"{task}: {steps} steps; reduced (layers 3..5) {r_s:.1f} s {r_eval} | full (layers 0..5) "
              f"{f_s:.1f} s {f_eval} | training speedup {f_s / r_s:.2f}x")
        if token:
            tagger = reduced
        else:
            classifier = reduced

    print("\n| task | metric | reduced (recycled, layers 3..5) | full fine-tune | train time reduced | train time full | speedup |")
    print("|---|---|---|---|---|---|---|")
    for task, _steps, r_s, f_s, r_eval, f_eval in rows:
        metric = "token-level tag F1 (token acc)" if task == "ner" else "window accuracy"
        fmt = (lambda e: f"{e['tag_f1']:.3f} ({e['accuracy']:.3f})") if task == "ner" else (lambda e: f"{e['accuracy']:.3f}")
        print(f"| {task} | {metric} | {fmt(r_eval)} | {fmt(f_eval)} | {r_s:.1f} s | {f_s:.1f} s | {f_s / r_s:.2f}x |")

    # 2. New text: windows not in the store are computed with MiniLM layers 0..2, then the tail runs.
    new = ["Create a new event loop and run the coroutine until it completes, then close the loop.",
           "The Message object holds the headers and the payload; use get_payload() to read the body, "
           "see email.message and RFC 5322 section 3."]
    scores = classifier.predict(new, store=store)
    tagged = tagger.predict(new, store=store)
    from erstore.tokenize import load_tokenizer

    tokenizer = load_tokenizer(store.recipe.tokenizer_name)
    for text, s, windows in zip(new, scores, tagged):
        ids = store.tokenize(text)[0][0]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        special = set(tokenizer.all_special_tokens)
        ents = [f"{t}/{TAGS[k]}" for t, k in zip(tokens, windows[0].argmax(-1))
                if k and not t.startswith("##") and t not in special]  # as trained: first sub-tokens
        print(f"\n{text!r}\n  package: {PACKAGES[int(np.argmax(s))]} "
              f"(p={float(torch.softmax(torch.tensor(s), -1).max()):.2f}); tags: {' '.join(ents) or '-'}")


if __name__ == "__main__":
    main()
