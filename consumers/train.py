"""A plain PyTorch training loop for a reduced model on a store.

Only parameters with requires_grad train: after `add_adapters`/`add_lora` that is adapters and
head; on a bare ReducedModel it is the whole tail and head (the paper's "R" setting).

`train` takes either a store with `erstore.labels.Examples` (or keys and one label per key; it
builds a `consumers.data` loader of stored states, or of stored token ids for the full
fine-tuning baseline `consumers.full.FullModel`, so both train through this one loop, loss and
budget), or any iterable of batches whose fields the model's forward accepts, e.g. `store.loader(...)` from
`erstore.torchdata` (prefetching, block-shuffled, resumable) or a torch DataLoader. For
`transformers.Trainer`, pass `consumers.data.StoreDataset` as train_dataset and
`consumers.data.PadCollate()` as data_collator: ReducedModel.forward takes the collate's keys
and returns a loss; `trainer.save_model(out)` and every `checkpoint-N/` load back with
`ReducedModel.from_pretrained`. Save-and-recycle training (states computed in epoch 1, read afterwards) is
in `consumers.recycle`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .data import loader


def make_optimizer(model: torch.nn.Module, *, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad; ValueError if there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter of the model is frozen")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    """One optimisation step on one batch (the model's forward must return a loss); returns it."""
    loss = model(**batch)["loss"]
    if loss is None:
        raise ValueError("the batch has no labels, so the model returned no loss; pass labels")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _store_of(data: Any) -> Any:
    """The erstore Store behind `data`: the store itself, or the dataset of a Loader / DataLoader."""
    if hasattr(data, "recipe") and hasattr(data, "read"):
        return data
    dataset = getattr(data, "dataset", None)
    store = getattr(dataset, "_store", None) or getattr(dataset, "store", None)
    return store if hasattr(store, "recipe") else None


def label_values(examples: Any) -> list[Any]:
    """One label per example as `consumers.data` collates it: a value, a token array, or (start, end)."""
    out = []
    for fields in examples.fields:
        out.append((fields["start_positions"], fields["end_positions"]) if "start_positions" in fields
                   else fields["labels"])
    return out


def store_batches(model: torch.nn.Module, store: Any, keys: Sequence[str], labels: Sequence[Any], *,
                  batch_size: int = 16, shuffle: bool = True, seed: int = 0) -> Iterable[dict[str, Any]]:
    """Batches for `model` from a store: token ids for a full model, layer-k states otherwise."""
    if getattr(model, "needs_token_ids", False):
        from .full import token_batches

        return token_batches(store, keys, labels, batch_size=batch_size, shuffle=shuffle, seed=seed)
    return loader(store, keys, labels, batch_size=batch_size, shuffle=shuffle, seed=seed)


def run_epochs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[dict[str, Any]],
               epochs: int) -> tuple[list[float], list[float]]:
    """The training loop: `epochs` passes over `batches`; (loss of every step, seconds of each epoch)."""
    losses: list[float] = []
    seconds: list[float] = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in batches:
            losses.append(step(model, optimizer, batch))
        seconds.append(time.perf_counter() - start)
    model.eval()
    return losses, seconds


def train(model: torch.nn.Module, data: Any, keys: Any = None,
          labels: Sequence[Any] | None = None, *, epochs: int = 1, batch_size: int = 16, lr: float = 1e-3,
          weight_decay: float = 0.0, seed: int = 0,
          optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train in place with AdamW; returns the loss of every step.

    Args:
        data: an `erstore.Store` (then `keys` is an `erstore.labels.Examples`, or a list of keys
            with `labels`, one label per key), or an iterable of batches such as
            `store.loader(labels=examples, shuffle=True)`; it is iterated once per epoch (an
            erstore Loader moves on to its next epoch by itself).
        optimizer: continue with this optimizer instead of a fresh AdamW(lr, weight_decay).

    Raises IncompatibleStoreError if the store (or the loader's store) holds another model's or
    another layer's states than the model's tail expects, as `ReducedModel.predict` does.

    Example:
        >>> examples = token_examples(store, "train.jsonl")
        >>> train(ReducedModel.for_store(store, task="token", num_labels=9), store, examples, epochs=3)
        >>> train(FullModel.for_store(store, task="token", num_labels=9), store, examples, epochs=3)
    """
    torch.manual_seed(seed)
    store = _store_of(data)
    if store is not None and hasattr(model, "check_store"):
        model.check_store(store)  # a store of another model or layer would train silently wrong
    optimizer = optimizer or make_optimizer(model, lr=lr, weight_decay=weight_decay)
    if hasattr(data, "recipe") and hasattr(data, "read"):  # an erstore Store
        if hasattr(keys, "keys_and_fields") and labels is None:  # erstore.labels.Examples
            keys, labels = keys.keys, label_values(keys)
        if keys is None or labels is None:
            raise ValueError("train(model, store, examples): give erstore.labels examples (or keys and "
                             "one label per key), or pass store.loader(labels=...) instead of the store")
        batches: Iterable[dict[str, Any]] = store_batches(model, data, list(keys), labels,
                                                          batch_size=batch_size, shuffle=True, seed=seed)
    elif keys is not None or labels is not None:
        raise ValueError("keys and labels are only used with a store; a loader brings its own labels")
    else:
        batches = data
    return run_epochs(model, optimizer, batches, epochs)[0]
