"""How items and label fields become batch tensors: `Collate` (per item) and `LabelColumns` (per dataset).

`Collate` pads a list of items (a picklable `collate_fn` for `torch.utils.data.DataLoader`):

    batch: hidden_states [B, L, d], attention_mask [B, L], input_ids [B, L], keys, boundaries, labels...

`LabelColumns` turns a dataset's label fields into arrays once, so the Loader lays out the labels
of many batches with a few numpy gathers instead of a Python loop per item. Both follow the same
rules: per-token fields (1-D numbers as long as the item) are padded with `label_pad`; scalars
become a tensor [B]; strings and other objects become lists.
Not here: reading (dataset.py), the Loader's batch layout (assemble.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from erstore import torchcodecs
from erstore.errors import InvalidInputError

LABEL_PAD = -100


class Collate:
    """Pad items to the longest in the batch (picklable: usable as a DataLoader collate_fn).

    Per-token fields (1-D values as long as the item) are padded with `label_pad`; scalars become
    a tensor [B]; strings and other objects become lists. `keys` holds the items' keys. The Loader
    takes `pad_token_id`, `label_pad` and `dtype` from the Collate it is given.
    """

    def __init__(self, *, pad_token_id: int = 0, label_pad: int = LABEL_PAD,
                 dtype: torch.dtype = torch.float32):
        self.pad_token_id, self.label_pad, self.dtype = pad_token_id, label_pad, dtype

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not items:
            raise InvalidInputError("cannot collate an empty batch")
        lengths = [len(it["input_ids"]) for it in items]
        b, width = len(items), max(lengths)
        parts = [_tensor(it["hidden_states"]) for it in items]
        padded = torch.empty(b, width, int(parts[0].shape[-1]), dtype=self.dtype)
        batch = self.frame(items)
        # Per item, one casting copy of its tokens and one zeroing of its padding, so each byte
        # of the batch is written once (torch casts fp16/bf16 fast, numpy does not).
        for row, part, n in zip(padded.unbind(0), parts, lengths):
            row[:n].copy_(part)
            row[n:].zero_()
        return {"hidden_states": padded, **batch}

    def frame(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Everything of the batch but `hidden_states`: mask, padded ids, keys, boundaries, labels."""
        lengths = [len(it["input_ids"]) for it in items]
        b, width = len(items), max(lengths)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        ids.view(-1).index_copy_(0, real_rows(mask), _concat([it["input_ids"] for it in items]).to(torch.long))
        batch: dict[str, Any] = {"attention_mask": mask, "input_ids": ids, "keys": [it["key"] for it in items]}
        if "boundary" in items[0]:
            batch["boundaries"] = torch.tensor([int(it["boundary"]) for it in items], dtype=torch.long)
        for name in items[0]:
            if name not in ("hidden_states", "input_ids", "key", "boundary"):
                batch[name] = pad_field([it.get(name) for it in items], lengths, width, self.label_pad)
        return batch


def pad_field(values: list[Any], lengths: Sequence[int], width: int, label_pad: int) -> Any:
    """One label field of a batch: per-token values padded to `width`, scalars stacked, else a list."""
    first = values[0]
    if isinstance(first, (str, bytes)) or first is None:
        return values
    arrays = [np.asarray(v) for v in values]
    if all(a.ndim == 1 and len(a) == n for a, n in zip(arrays, lengths)) and arrays[0].dtype.kind in "iuf":
        out = np.full((len(values), width), label_pad, dtype=np.result_type(*arrays))
        for i, (a, n) in enumerate(zip(arrays, lengths)):
            out[i, :n] = a
        return torch.from_numpy(out)
    try:
        return torch.from_numpy(np.stack(arrays))
    except (ValueError, TypeError):
        return values


class LabelColumns:
    """A dataset's label fields as columns, classified once: "scalar" (one number per item, one
    dtype), "token" (one number per token, one dtype; kept flat with per-item offsets), or
    "other" (laid out per batch by `pad_field`, exactly as `Collate` does)."""

    def __init__(self, fields: Sequence[Mapping[str, Any]], lengths: np.ndarray):
        self.names: list[str] = list(fields[0]) if fields else []
        self.kinds: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for name in self.names:
            column = [f.get(name) for f in fields]
            self.kinds[name], self.values[name] = self._classify(column, lengths)
            if self.kinds[name] == "token":
                self.offsets[name] = np.r_[0, np.cumsum(lengths)].astype(np.int64)

    @staticmethod
    def _classify(column: list[Any], lengths: np.ndarray) -> tuple[str, Any]:
        kinds = {type(v) for v in column}
        if len(kinds) == 1 and next(iter(kinds)) in (int, float, bool, np.int64, np.int32, np.float32, np.float64):
            scalar = np.asarray(column)
            if scalar.ndim == 1 and scalar.dtype.kind in "iufb":
                return "scalar", scalar
        if column and not isinstance(column[0], (str, bytes)) and column[0] is not None:
            arrays = [np.asarray(v) for v in column]
            dtypes = {a.dtype for a in arrays}
            if len(dtypes) == 1 and arrays[0].dtype.kind in "iuf" and \
                    all(a.ndim == 1 and len(a) == n for a, n in zip(arrays, lengths.tolist())):
                return "token", np.concatenate(arrays + [np.zeros(1, arrays[0].dtype)])
        return "other", column


def real_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the real (unpadded) token positions of a [B, L] mask, in row order."""
    return mask.view(-1).nonzero().squeeze(1)


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torchcodecs.as_tensor(value)


def _concat(values: list[Any]) -> torch.Tensor:
    """Row-concatenation of numpy arrays or tensors, as one tensor."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values)
    return torchcodecs.as_tensor(np.concatenate([np.asarray(v) for v in values]))
