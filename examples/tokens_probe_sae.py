"""Train a linear probe and a small sparse autoencoder (SAE) on a store's token feed.

    HF_HUB_OFFLINE=1 python examples/tokens_probe_sae.py [--store /tmp/erstore-example-minilm-l3]

Builds the store first if it does not exist (the packaged all-MiniLM-L6-v2, layer 3, over the
default corpus; about a minute on 2 CPU cores). Then, with `store.tokens(...)` feeding shuffled
batches of single token rows (special tokens dropped, float32):

1. Splits the stored windows into train and test keys (every `--test-every`-th key is test).
2. Probe: a linear layer that reads which of the `--classes` most frequent training tokens a
   layer-k state belongs to (token identity is still linearly readable at layer 3); accuracy on
   the test tokens of those classes, against always guessing the most frequent class.
3. SAE: ReLU encoder to `--latents` features, linear decoder, L1 penalty weighted by decoder
   norms; inputs scaled to a mean squared norm of d. Reports, on the test tokens, the fraction of
   variance unexplained (FVU), mean active features per token (L0) and features never active.

Prints one JSON line with the metrics at the end. Every epoch visits each training token once,
in a new order; the feed's state_dict() would resume it mid-epoch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import erstore


def split_keys(store: erstore.Store, every: int) -> tuple[list[str], list[str]]:
    keys = sorted(store)  # keys are content hashes: sorted order is unrelated to corpus order
    return [k for i, k in enumerate(keys) if i % every], keys[::every]


def train_probe(store: erstore.Store, train: list[str], test: list[str], args: argparse.Namespace) -> dict:
    options = {"batch_size": args.batch_size, "drop_special": True, "dtype": "float32"}
    counts = np.zeros(0, dtype=np.int64)
    for batch in store.tokens(train, shuffle=False, **options):  # one pass for the class list
        ids = batch.token_ids.astype(np.int64)
        counts = np.pad(counts, (0, max(0, int(ids.max()) + 1 - len(counts)))) + np.bincount(ids, minlength=len(counts))
    classes = np.argsort(-counts)[: args.classes]
    label_of = np.full(len(counts) + 1, -1, dtype=np.int64)
    label_of[classes] = np.arange(len(classes))

    def labelled(batch: erstore.tokens.TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        y = label_of[np.minimum(batch.token_ids, len(label_of) - 1)]
        keep = y >= 0
        return torch.from_numpy(batch.states[keep]), torch.from_numpy(y[keep])

    probe = torch.nn.Linear(store.recipe.hidden_size, len(classes))
    opt = torch.optim.Adam(probe.parameters(), lr=args.lr)
    feed = store.tokens(train, seed=args.seed, **options)
    for _ in range(args.epochs):
        for batch in feed:  # the rest of this epoch, then (next loop) the next one
            x, y = labelled(batch)
            if len(y):
                loss = torch.nn.functional.cross_entropy(probe(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    correct = total = 0
    test_counts = np.zeros(len(classes), dtype=np.int64)
    with torch.no_grad():
        for batch in store.tokens(test, shuffle=False, **options):
            x, y = labelled(batch)
            correct += int((probe(x).argmax(1) == y).sum())
            total += len(y)
            test_counts += np.bincount(y.numpy(), minlength=len(classes))
    return {"probe_classes": len(classes), "probe_test_tokens": total,
            "probe_accuracy": round(correct / max(1, total), 4),
            "probe_majority_baseline": round(int(test_counts.max(initial=0)) / max(1, total), 4)}


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, d: int, latents: int):
        super().__init__()
        self.encoder = torch.nn.Linear(d, latents)
        self.decoder = torch.nn.Linear(latents, d)
        with torch.no_grad():  # decoder starts as the encoder's transpose, unit-norm features
            self.decoder.weight.copy_(torch.nn.functional.normalize(self.encoder.weight.T, dim=0))
            self.encoder.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.encoder(x - self.decoder.bias))
        return self.decoder(f), f


def train_sae(store: erstore.Store, train: list[str], test: list[str], args: argparse.Namespace) -> dict:
    options = {"batch_size": args.sae_batch_size, "drop_special": True, "dtype": "float32"}
    feed = store.tokens(train, seed=args.seed + 1, **options)
    d = store.recipe.hidden_size
    first = torch.from_numpy(next(iter(store.tokens(train, seed=99, **options))).states)
    scale = float((d / first.pow(2).sum(1).mean()).sqrt())  # mean squared norm d after scaling
    sae = SparseAutoencoder(d, args.latents)
    with torch.no_grad():
        sae.decoder.bias.copy_(first.mean(0) * scale)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    for _ in range(args.epochs):
        for batch in feed:
            x = torch.from_numpy(batch.states) * scale
            x_hat, f = sae(x)
            sparsity = (f * sae.decoder.weight.norm(dim=0)).sum(1).mean()
            loss = (x_hat - x).pow(2).sum(1).mean() + args.l1 * sparsity
            opt.zero_grad()
            loss.backward()
            opt.step()
    err = var = active = tokens = 0.0
    ever = torch.zeros(args.latents, dtype=torch.bool)
    mean = first.mean(0) * scale
    with torch.no_grad():
        for batch in store.tokens(test, shuffle=False, **options):
            x = torch.from_numpy(batch.states) * scale
            x_hat, f = sae(x)
            err += float((x_hat - x).pow(2).sum())
            var += float((x - mean).pow(2).sum())
            active += float((f > 0).sum())
            tokens += len(x)
            ever |= (f > 0).any(0)
    return {"sae_latents": args.latents, "sae_test_tokens": int(tokens), "sae_fvu": round(err / var, 4),
            "sae_l0": round(active / max(1, tokens), 1), "sae_dead_fraction": round(1 - float(ever.float().mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "erstore-example-minilm-l3"))
    ap.add_argument("--limit", type=int, default=4000, help="corpus documents if the store is built")
    ap.add_argument("--batch-size", type=int, default=4096, help="probe batch (tokens)")
    ap.add_argument("--sae-batch-size", type=int, default=1024, help="SAE batch (tokens): more, smaller steps")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--latents", type=int, default=1536)
    ap.add_argument("--l1", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if not (Path(args.store) / "erstore.json").exists():
        print(f"building {args.store} (MiniLM layer 3, {args.limit} documents) ...")
        erstore.build(layers=(3,), store=args.store, limit=args.limit, progress=False)
    store = erstore.open(args.store)
    train, test = split_keys(store, args.test_every)
    t = time.perf_counter()
    results = {"store": args.store, "layer": store.recipe.layer, "train_windows": len(train),
               "test_windows": len(test), "epochs": args.epochs, **train_probe(store, train, test, args)}
    print(f"probe: {results['probe_accuracy']:.3f} accuracy over {results['probe_classes']} token classes "
          f"(majority {results['probe_majority_baseline']:.3f})")
    results.update(train_sae(store, train, test, args))
    print(f"SAE: FVU {results['sae_fvu']:.3f}, L0 {results['sae_l0']:.1f} of {args.latents}, "
          f"dead {results['sae_dead_fraction']:.3f}")
    results["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
