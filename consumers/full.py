"""The full fine-tuning baseline: the whole transformers model plus the same head, on token ids.

    full = FullModel.for_store(store, task="token", num_labels=9)
    train(full, store, examples, epochs=3)          # consumers.train: the same loop and loss
    full.predict_words([["Marie", "Curie", "visited", "Paris"]], store=store)

`FullModel` runs every layer of the store's model (loaded from its recipe and checked against the
store's weight fingerprint) and the head a `ReducedModel` of the same store would get, so the
two differ only in which layers run and train. Its loss is the reduced model's (it reuses
`ReducedModel.forward` on the last hidden state). Batches hold token ids read from the store
(`token_batches`): every stored window carries its ids, so the baseline trains on exactly the
windows and examples the reduced models train on. `consumers.train.train` picks these batches
for a `FullModel` by itself.

Not here: saving (use `torch.save(model.state_dict())` or the transformers model's
`save_pretrained`), mixed precision, gradient accumulation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import PadCollate
from .heads import head_for_tail
from .reduced import ReducedModel
from .serving import Serving
from erstore.errors import IncompatibleStoreError

HEAD_TASK = {"classification": "sequence", "ner": "token", "qa": "qa"}


class _Identity(nn.Module):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_states


class FullModel(nn.Module, Serving):
    """The whole base model + a head; forward(input_ids, attention_mask, token_type_ids, labels...)."""

    needs_token_ids = True  # consumers.train feeds token-id batches

    def __init__(self, base: nn.Module, head: nn.Module, token_types: bool):
        super().__init__()
        self.base, self.token_types = base, token_types
        self.reduced = ReducedModel(_Identity(), head)  # reuses the reduced model's losses

    @classmethod
    def for_store(cls, store: Any, *, task: str = "sequence", num_labels: int = 2, seed: int | None = None,
                  **head_options: Any) -> FullModel:
        """The store's model (fingerprint-checked) with a fresh `task` head (sequence, token, qa)."""
        base, token_types, head_tail = load_base(store)
        if seed is not None:
            torch.manual_seed(seed)
        head = head_for_tail(HEAD_TASK.get(task, task), head_tail, num_labels, **head_options)
        return cls(copy.deepcopy(base), head, token_types)

    @property
    def task(self) -> str:
        return self.reduced.task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **labels: Any) -> Any:
        extra = {"token_type_ids": token_type_ids} if self.token_types else {}
        h = self.base(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.reduced(h, attention_mask, **labels)

    @torch.no_grad()
    def window_logits(self, windows: list[list[tuple[list[int], int]]], *, store: Any = None,
                      write_back: bool = False, batch_size: int = 32) -> list[list[np.ndarray]]:
        """Per text, per window: logits of the whole model on the window's token ids."""
        flat = [(np.asarray(ids, dtype=np.int64), b) for ws in windows for ids, b in ws]
        collate, logits = IdCollate(), []
        self.eval()
        for start in range(0, len(flat), batch_size):
            chunk = flat[start: start + batch_size]
            out = self(**collate([{"ids": ids, "boundary": b} for ids, b in chunk]))
            values = out.logits if self.task != "qa" else torch.stack([out.start_logits, out.end_logits], -1)
            for row, (ids, _) in enumerate(chunk):
                logits.append(values[row].numpy() if values.dim() == 2 else values[row, : len(ids)].numpy())
        results, i = [], 0
        for ws in windows:
            results.append(logits[i: i + len(ws)])
            i += len(ws)
        return results

    def predict(self, texts: list[str], *, store: Any, pairs: list[str] | None = None,
                batch_size: int = 32, **_: Any) -> list[Any]:
        """As `ReducedModel.predict`: averaged logits (sequence) or per-window logits."""
        windows = [store.tokenize(t, None if pairs is None else pairs[i]) for i, t in enumerate(texts)]
        per_text = self.window_logits(windows, store=store, batch_size=batch_size)
        return [np.mean(mine, axis=0) if self.task == "sequence" else mine for mine in per_text]


def load_base(store: Any) -> tuple[nn.Module, bool, nn.Module]:
    """(the store's transformers model, whether it takes token types, a 0-layer tail for the head)."""
    from .registry import tail_class
    from erstore.model import LayerExtractor

    extractor = LayerExtractor(store.recipe.model_name)
    if extractor.fingerprint != store.recipe.model_fingerprint:
        raise IncompatibleStoreError(
            f"model {store.recipe.model_name!r} has fingerprint {extractor.fingerprint}, the "
            f"store was built with {store.recipe.model_fingerprint}; load the same weights")
    # A zero-layer tail only to give the head its family style and pretrained pooler.
    head_tail = tail_class(store.recipe.model_type).from_model(extractor.model, extractor.num_layers)
    head_tail.recipe = store.recipe  # heads that read the model's own settings (embedding, causal-lm) find it
    return extractor.model, extractor.accepts_token_types(), head_tail


class IdCollate:
    """Pads stored token ids (and labels) for the full model: input_ids, attention_mask, token types."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(it["ids"]) for it in items)
        ids = torch.zeros(len(items), length, dtype=torch.long)
        mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
        for row, it in enumerate(items):
            ids[row, : len(it["ids"])] = torch.as_tensor(it["ids"])
            mask[row, : len(it["ids"])] = 1
            if it["boundary"]:
                types[row, it["boundary"]: len(it["ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if "label" in items[0]:
            batch.update(PadCollate().labels([it["label"] for it in items], length))
        return batch


def token_batches(store: Any, keys: Sequence[str], labels: Sequence[Any] | None = None, *,
                  batch_size: int = 16, shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader of token-id batches of stored windows (one item per key; keys may repeat)."""
    ids = {e.key: (np.asarray(e.token_ids, dtype=np.int64), e.boundary) for e in store.read(sorted(set(keys)))}
    items = [{"ids": ids[k][0], "boundary": ids[k][1], **({} if labels is None else {"label": labels[i]})}
             for i, k in enumerate(keys)]
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=IdCollate(),
                                       generator=torch.Generator().manual_seed(seed))
