"""A plain PyTorch training loop for a reduced model on a store.

Only parameters with requires_grad train: after `add_adapters`/`add_lora` that is adapters and
head; on a bare ReducedModel it is the whole tail and head (the paper's "R" setting). For
`transformers.Trainer`, pass `consumers.data.StoreDataset` as train_dataset and
`consumers.data.PadCollate()` as data_collator: ReducedModel.forward takes the collate's keys
and returns a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from consumers.data import loader


def train(model: torch.nn.Module, store: Any, keys: Sequence[str], labels: Sequence[Any], *,
          epochs: int = 1, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 0.0,
          seed: int = 0) -> list[float]:
    """Train in place with AdamW; returns the loss of every step."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter of the model is frozen")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    data = loader(store, keys, labels, batch_size=batch_size, shuffle=True, seed=seed)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        for batch in data:
            loss = model(**batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses
