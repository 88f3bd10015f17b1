"""Feeding stored states to a reduced model: a map-style dataset and a padding collate.

Used when `erstore.torchdata` (the engine's own torch bridge) is not available. The dataset
keeps only the store's URL and version and opens the store lazily in each process, because
TensorStore handles do not survive fork (see FACTS). Both classes are plain picklable objects.

Labels: an int/float per sequence, a list per token (padded with -100), or a (start, end) pair
for extractive QA (returned as start_positions / end_positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class StoreDataset(torch.utils.data.Dataset):
    """(states, label) for each key of one store version."""

    def __init__(self, store: Any, keys: Sequence[str], labels: Sequence[Any] | None = None):
        if labels is not None and len(labels) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(labels)} labels; give one label per key")
        self.url, self.version = str(store.location.url), store.version
        self.keys, self.labels = list(keys), None if labels is None else list(labels)
        self._store = store

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    def store(self) -> Any:
        if self._store is None:
            import erstore

            self._store = erstore.open(self.url, version=self.version)
        return self._store

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.store().read([self.keys[i]])[0]
        item: dict[str, Any] = {"states": entry.states, "input_ids": entry.token_ids}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


class PadCollate:
    """Pads states to the longest sequence: hidden_states [B, L, d] float32, attention_mask [B, L],
    and input_ids [B, L] (0 where padded) when the items carry token ids."""

    def __init__(self, label_pad: int = -100):
        self.label_pad = label_pad

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        states = [np.asarray(it["states"], dtype=np.float32) for it in items]
        length, d = max(len(s) for s in states), states[0].shape[1]
        hidden = torch.zeros(len(states), length, d)
        mask = torch.zeros(len(states), length, dtype=torch.long)
        for row, s in enumerate(states):
            hidden[row, : len(s)] = torch.from_numpy(s)
            mask[row, : len(s)] = 1
        batch = {"hidden_states": hidden, "attention_mask": mask}
        if all(it.get("input_ids") is not None for it in items):
            ids = torch.zeros(len(states), length, dtype=torch.long)
            for row, it in enumerate(items):
                ids[row, : len(it["input_ids"])] = torch.as_tensor(np.asarray(it["input_ids"], dtype=np.int64))
            batch["input_ids"] = ids
        if "label" in items[0]:
            batch.update(self.labels([it["label"] for it in items], length))
        return batch

    def labels(self, labels: list[Any], length: int) -> dict[str, torch.Tensor]:
        first = labels[0]
        if isinstance(first, tuple):
            starts, ends = zip(*labels)
            return {"start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}
        if isinstance(first, (list, np.ndarray)):
            out = torch.full((len(labels), length), self.label_pad, dtype=torch.long)
            for row, lab in enumerate(labels):
                out[row, : len(lab)] = torch.as_tensor(lab)
            return {"labels": out}
        return {"labels": torch.tensor(labels)}


def loader(store: Any, keys: Sequence[str], labels: Sequence[Any] | None = None, *,
           batch_size: int = 16, shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over stored keys (main process: TensorStore reads are already parallel)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(StoreDataset(store, keys, labels), batch_size=batch_size,
                                       shuffle=shuffle, collate_fn=PadCollate(), generator=generator)
