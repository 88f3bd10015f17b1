"""Save-and-recycle training (the paper's "SR" setting): compute layers 0..k once, then read them.

Training on a corpus that is not in the store yet: epoch 1 runs the store's model up to layer k
(`erstore.model.LayerExtractor`, no grad) on each batch, trains the reduced model on those
states and appends them to the store; at the end of epoch 1 they are committed as one new
version. Epochs 2.. read the same windows from the store with `erstore.torchdata`'s prefetching
Loader, so from then on a step costs only layers k..N-1 (the paper's "R" setting).

    model = ReducedModel.for_store(store, task="sequence", num_labels=4)
    report = save_and_recycle(model, store, texts, labels, epochs=6)
    report.epochs[0]["computed"], report.version        # windows computed in epoch 1, new version

Every epoch sees the same numbers: computed states are rounded through the store's codec
(with the params of the store's existing builds where it has any) before epoch 1 trains on
them, which is exactly what later epochs read back. Epoch 1 computes each batch padded, as
training batches are, so stored rows can differ from a lone run of the sequence by float
rounding (~1e-6), unlike `erstore build`'s equal-length batches. Windows already stored are read,
not recomputed; a window that occurs twice in the corpus is stored once.

Labels: one int/float per text (every window of the text gets it) or, for token tasks, one
label per token of a text that fits in one window (-100 to ignore a token). Not here: QA labels,
several store writers (one SaveAndRecycle per store at a time), resuming epoch 1 after a crash
(rerunning adopts what the killed run made durable, like a build).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .train import make_optimizer, step
from erstore.errors import InvalidInputError, StoreNotFoundError
from erstore.manifest import Recipe


def recipe_for(model: str, *, layer: int, dtype: str = "float16", codec: str = "lossless",
               max_length: int | None = None, stride: int | None = None) -> Recipe:
    """The recipe `erstore build` would give a store of `model` at `layer` with these settings.

    Use it to train with save-and-recycle into a store that does not exist yet:
    `ReducedModel.for_store(recipe_for("all-MiniLM-L6-v2", layer=3), ...)`. A later
    `erstore build` with the same settings writes into the same store.
    """
    from erstore.codecs import parse_codec
    from erstore.model import LayerExtractor
    from erstore.tokenize import Windower, load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(model)
    length = max_length or min(512, int(tokenizer.model_max_length))
    windower = Windower(tokenizer, length, length // 4 if stride is None else stride)
    extractor = LayerExtractor(model)
    extractor.check_layer(layer)
    return Recipe(model_fingerprint=extractor.fingerprint, layer=layer,
                  tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), max_length=windower.max_length,
                  stride=windower.stride, codec=parse_codec(codec, dtype=dtype).to_dict(),
                  hidden_size=extractor.hidden_size, num_layers=extractor.num_layers, model_name=model,
                  model_type=extractor.config.model_type, tokenizer_name=model,
                  config=extractor.config.to_diff_dict())


@dataclass
class RecycleReport:
    """What `SaveAndRecycle.fit` did: per-step losses, per-epoch counts and the committed version."""

    losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)  # epoch, steps, computed, read, seconds
    version: int | None = None  # the version epoch 1 committed (None: everything was stored already)
    store: str = ""


class SaveAndRecycle:
    """Trains a ReducedModel on texts, storing layer-k states in epoch 1 and reading them after.

    Args:
        model: a `ReducedModel` (its tail's recipe says which model, layer and codec).
        store: an `erstore.Store` or a store path/URL; created with the model's recipe if absent.
        batch_size, seed: training batches (seeded shuffle, a new order each epoch).
        prefetch: batches the Loader prepares ahead in epochs 2.. .
    """

    def __init__(self, model: Any, store: Any, *, batch_size: int = 32, seed: int = 0, prefetch: int = 2,
                 **store_options: Any):
        recipe = getattr(model.tail, "recipe", None)
        if recipe is None:
            raise InvalidInputError("the model's tail has no recipe; make it with ReducedModel.for_store")
        self.model, self.recipe = model, recipe
        self.url = str(store.location.url) if hasattr(store, "location") else str(store)
        self.batch_size, self.seed, self.prefetch = batch_size, seed, prefetch
        self.store_options = store_options
        self._windower: Any = None

    def open(self) -> Any:
        """The newest version of the store, or None while it does not exist."""
        import erstore

        try:
            return erstore.open(self.url, **self.store_options)
        except StoreNotFoundError:
            return None

    def examples(self, texts: Sequence[str], labels: Sequence[Any],
                 pairs: Sequence[str] | None = None) -> list[tuple[str, list[int], int, Any]]:
        """(key, token ids, boundary, label) of every window of every text, labels expanded."""
        from erstore.keys import window_key
        from erstore.tokenize import Windower

        if len(texts) != len(labels) or (pairs is not None and len(pairs) != len(texts)):
            raise InvalidInputError(f"{len(texts)} texts, {len(labels)} labels"
                                    + ("" if pairs is None else f", {len(pairs)} pairs") + "; give one each")
        if self._windower is None:
            self._windower = Windower.from_recipe(self.recipe)
        windows = self._windower.windows_batch(list(texts), None if pairs is None else list(pairs))
        out = []
        for n, (ws, label) in enumerate(zip(windows, labels)):
            per_token = isinstance(label, (list, tuple, np.ndarray))
            if per_token and (len(ws) != 1 or len(label) != len(ws[0][0])):
                raise InvalidInputError(
                    f"text {n}: per-token labels need a text that fits in one window and one label per "
                    f"token; it has {len(ws)} window(s) of {[len(w[0]) for w in ws]} tokens and "
                    f"{len(label)} labels (align word tags with erstore.labels.token_labels' rules)"
                )
            for ids, b in ws:
                out.append((window_key(ids, b), ids, b, np.asarray(label, dtype=np.int64) if per_token else label))
        return out

    def fit(self, texts: Sequence[str], labels: Sequence[Any], *, epochs: int = 6, lr: float = 1e-3,
            weight_decay: float = 0.0, pairs: Sequence[str] | None = None,
            optimizer: torch.optim.Optimizer | None = None,
            on_batch: Callable[[int, dict[str, Any]], None] | None = None) -> RecycleReport:
        """Train for `epochs`; epoch 1 computes and commits, later epochs read. Returns a report.

        `on_batch(epoch, batch)` sees every training batch (epoch counts from 0).
        """
        return self.fit_examples(self.examples(texts, labels, pairs), epochs=epochs, lr=lr,
                                 weight_decay=weight_decay, optimizer=optimizer, on_batch=on_batch)

    def fit_examples(self, examples: Sequence[tuple[str, Sequence[int], int, Any]], *, epochs: int = 6,
                     lr: float = 1e-3, weight_decay: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
                     on_batch: Callable[[int, dict[str, Any]], None] | None = None) -> RecycleReport:
        """`fit` on windows you tokenized yourself: (key, token ids, boundary, label) tuples, with
        keys from `erstore.keys.window_key(ids, boundary)` and windows of the store's recipe."""
        if epochs < 1:
            raise InvalidInputError(f"epochs must be at least 1, got {epochs}")
        torch.manual_seed(self.seed)
        examples = list(examples)
        by_key: dict[str, Any] = {}
        for key, _, _, label in examples:
            old = by_key.setdefault(key, label)
            if not np.array_equal(old, label):
                raise InvalidInputError(
                    f"window {key} occurs twice with different labels ({old} vs {label}); identical "
                    "windows are stored once, so their labels must agree"
                )
        optimizer = optimizer or make_optimizer(self.model, lr=lr, weight_decay=weight_decay)
        report = RecycleReport(store=self.url)
        self.model.train()
        try:
            report.version = self._first_epoch(examples, optimizer, report, on_batch)
            store = self.open()
            keys = [e[0] for e in examples]
            with store.loader(keys, labels={k: {"labels": v} for k, v in by_key.items()},
                              batch_size=self.batch_size, shuffle=True, seed=self.seed,
                              prefetch=self.prefetch) as loader:
                loader.set_epoch(1)
                for epoch in range(1, epochs):
                    t0, first = time.perf_counter(), len(report.losses)
                    for batch in loader:
                        if on_batch is not None:
                            on_batch(epoch, batch)
                        report.losses.append(step(self.model, optimizer, batch))
                    report.epochs.append({"epoch": epoch, "steps": len(report.losses) - first, "computed": 0,
                                          "read": len(keys), "seconds": time.perf_counter() - t0})
        finally:
            self.model.eval()
        return report

    def _first_epoch(self, examples: list, optimizer: torch.optim.Optimizer, report: RecycleReport,
                     on_batch: Callable | None) -> int | None:
        from erstore.torchdata import Collate
        from erstore.writer import StoreWriter

        from .reduced import build_params

        t0, first = time.perf_counter(), len(report.losses)
        store = self.open()
        codec, recipe = self._codec(), self.recipe
        params = build_params(store) if store is not None else None
        collate = Collate()
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        computed = read = 0
        with StoreWriter(self.url, recipe, **self.store_options) as writer:
            if params is not None:
                writer._params = params  # new rows are encoded like the rows already stored
            for start in range(0, len(order), self.batch_size):
                batch_ex = [examples[i] for i in order[start : start + self.batch_size]]
                stored = [e for e in batch_ex if store is not None and e[0] in store]
                states = {e.key: e.states for e in (store.read([e[0] for e in stored]) if stored else [])}
                todo = [e for e in batch_ex if e[0] not in states]
                if todo:
                    raw = self._compute(todo)
                    if params is None:
                        params = codec.fit(np.concatenate(raw))
                        writer._params = params
                    for (key, ids, b, _), s in zip(todo, raw):
                        states[key] = np.asarray(codec.decode(codec.encode(s, params), params))
                        if not writer.contains(key):
                            writer.append(key, s, np.asarray(ids), boundary=b)
                computed, read = computed + len(todo), read + len(stored)
                batch = collate([{"hidden_states": states[k], "input_ids": np.asarray(ids, dtype=np.int64),
                                  "key": k, "boundary": b, "labels": lab} for k, ids, b, lab in batch_ex])
                if on_batch is not None:
                    on_batch(0, batch)
                report.losses.append(step(self.model, optimizer, batch))
            manifest = writer.commit(build={"source": "consumers.recycle", "computed": computed,
                                            "read": read, "windows": len(examples)})
        report.epochs.append({"epoch": 0, "steps": len(report.losses) - first, "computed": computed,
                              "read": read, "seconds": time.perf_counter() - t0})
        return manifest.version if manifest is not None else None

    def _codec(self) -> Any:
        from erstore.codecs import codec_from_dict

        return codec_from_dict(self.recipe.codec)

    def _compute(self, todo: list) -> list[np.ndarray]:
        """hidden_states[k] of each window (float32, unpadded), from one padded forward pass."""
        extractor = self.model._extractor_for(self.recipe)
        pad = getattr(getattr(self._windower, "tokenizer", None), "pad_token_id", None) or 0
        width = max(len(e[1]) for e in todo)
        ids = torch.full((len(todo), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        types = torch.zeros_like(ids) if extractor.accepts_token_types() else None
        for row, (_, tok, b, _) in enumerate(todo):
            ids[row, : len(tok)] = torch.tensor(tok)
            mask[row, : len(tok)] = 1
            if types is not None and b:
                types[row, b : len(tok)] = 1
        dev = extractor.device
        out = extractor(ids.to(dev), mask.to(dev), None if types is None else types.to(dev),
                        [self.recipe.layer])[self.recipe.layer]
        out = out.float().cpu().numpy()
        return [out[row, : len(e[1])] for row, e in enumerate(todo)]


def save_and_recycle(model: Any, store: Any, texts: Sequence[str], labels: Sequence[Any], *,
                     epochs: int = 6, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                     **options: Any) -> RecycleReport:
    """`SaveAndRecycle(model, store, batch_size=, seed=).fit(texts, labels, epochs=, lr=, ...)`."""
    sr = SaveAndRecycle(model, store, batch_size=batch_size, seed=seed)
    return sr.fit(texts, labels, epochs=epochs, lr=lr, **options)


__all__ = ["RecycleReport", "SaveAndRecycle", "recipe_for", "save_and_recycle"]
