"""Batch assembly: padded batches laid out from a read group's rows with a few vectorised gathers.

The Loader reads consecutive batches in read groups (one storage read each). `GroupRows` is where a
read group's raw stored parts arrive from storage: the spans of one `PendingRead`, concatenated
(per build for lossy codecs, all builds together for lossless ones) with a zero row appended, so
that every token of every batch is "row `i` of the group" and every padding position is "the zero
row". A run of consecutive batches (a `Run`) is then laid out at once:

- host: one `index_select` of the group's decoded rows into the run's padded [sum B*L, d] buffer
  (padding gathers the zero row), one for the token ids, one numpy op for the mask; label
  columns by the same index. Batches are views of the run's buffers.
- device: the run's real rows of every stored part, its token ids, destination rows, boundaries
  and label columns are gathered into ONE (pinned) staging buffer, copied to the device with one
  host-to-device copy, and decoded, padded and laid out there by a fixed handful of kernels per
  run (~8 for a lossless store), whatever the batch size or number of sequences.

Python work per run is a constant number of numpy/torch calls, not a loop over sequences, so the
prefetch thread needs the GIL rarely (a consumer that holds it in a Python loop barely slows it).
Values are those `Collate` produces from `store.read`: same decode per row (int4's rotation, a
BLAS product, is decoded batch by batch on exactly the rows it was before), same casts.
Not here: the order of batches (erstore.shuffle), threads and queues (producer.py, loader.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from erstore import torchcodecs
from erstore.codecs import Codec, Int4Codec
from erstore.torchdata.collate import pad_field

_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
          "int64": torch.int64, "bool": torch.bool}


def row_independent(codec: Codec | None) -> bool:
    """Whether decoding a set of rows gives each row the same bits whatever else is decoded with
    it (all codecs but int4's Hadamard rotation, a BLAS matrix product)."""
    return not (isinstance(codec, Int4Codec) and codec.rotate)


class GroupRows:
    """One read group's rows: stored parts, token ids, and where each of its sequences starts.

    Args:
        spans: `PendingRead.spans()` of the group's read: this is where the stored bytes arrive.
        rows: stored start row of each sequence of the group (the positions read, in order).
        codec, params: the store's codec and each build slot's codec parameters (`slot -> params`).
        pad_token_id: the token id of padding (appended after the last token row).
    Attributes: `offset[i]` is the group row of sequence i's first token; row `zero` is padding.
    """

    def __init__(self, spans: Sequence[tuple[int, int, list[int], dict[str, np.ndarray], np.ndarray]],
                 rows: np.ndarray, codec: Codec | None, params: dict[int, dict[str, Any]], pad_token_id: int):
        self.codec, self.params = codec, params
        self.lossless = codec is None or codec.lossless
        self.offset = np.empty(len(rows), dtype=np.int64)
        order = sorted(range(len(spans)), key=lambda s: spans[s][0])  # build slot by build slot
        self.slots: list[int] = []
        self.bases: list[int] = []  # group row where each slot's rows start
        self.raw: list[dict[str, np.ndarray]] = []  # per slot (lossy) or one for all (lossless)
        base, pieces, tokens = 0, [], []
        for s in order:
            slot, start, members, parts, toks = spans[s]
            if not self.slots or self.slots[-1] != slot:
                self.slots.append(slot)
                self.bases.append(base)
                pieces.append([])
            members_ = np.asarray(members, dtype=np.int64)
            self.offset[members_] = base + rows[members_] - start
            pieces[-1].append(parts)
            tokens.append(toks)
            base += len(toks)
        self.zero = base
        self.tokens = np.concatenate([*tokens, np.full(1, pad_token_id, dtype=tokens[0].dtype if tokens else np.int32)])
        names = list(pieces[0][0]) if pieces else []
        if self.lossless:  # parameters play no part: one row space for all builds, zero row included
            flat = [p for slot_pieces in pieces for p in slot_pieces]
            self.raw = [{n: _concat([p[n] for p in flat], zero_row=True) for n in names}]
        else:
            self.raw = [{n: _concat([p[n] for p in sp]) for n in names} for sp in pieces]
        self._source: torch.Tensor | None = None

    @classmethod
    def decoded(cls, entries: Sequence[Any], pad_token_id: int) -> GroupRows:
        """A group of already decoded entries (forked DataLoader workers read without TensorStore)."""
        lengths = [len(e.token_ids) for e in entries]
        starts = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64) if entries else np.zeros(0, np.int64)
        spans = [(0, 0, list(range(len(entries))), {"states": np.concatenate([np.asarray(e.states) for e in entries])},
                  np.concatenate([np.asarray(e.token_ids) for e in entries]))] if entries else []
        return cls(spans, starts, None, {}, pad_token_id)

    def slot_of(self, rows: np.ndarray) -> np.ndarray:
        """Index (into `self.slots`) of the build each group row belongs to."""
        return np.searchsorted(np.asarray(self.bases[1:], dtype=np.int64), rows, side="right")

    def _decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray:
        if self.codec is None:
            return parts["states"]
        return self.codec.decode(parts, self.params.get(self.slots[k], {}))

    def source(self) -> torch.Tensor:
        """Decoded rows of the whole group plus the zero row, [rows + 1, d] (stored dtype for lossless
        codecs, float32 otherwise); decoded once per group (row-independent codecs only)."""
        if self._source is None:
            if self.lossless:
                self._source = torchcodecs.as_tensor(self._decode(self.raw[0], 0))
            else:
                decoded = [self._decode(parts, k) for k, parts in enumerate(self.raw)]
                self._source = torchcodecs.as_tensor(_concat(decoded, zero_row=True))
        return self._source


def _concat(arrays: list[np.ndarray], *, zero_row: bool = False) -> np.ndarray:
    """Row concatenation, optionally with one zero row after the last (one copy either way)."""
    if not zero_row and len(arrays) == 1:
        return arrays[0]
    if not arrays:
        raise ValueError("nothing to concatenate")
    rows = sum(len(a) for a in arrays)
    out = np.empty((rows + int(zero_row), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    np.concatenate(arrays, out=out[:rows])
    if zero_row:
        out[rows:] = 0
    return out


@dataclass
class Run:
    """A run of consecutive batches of one read group, laid out together.

    `items`: dataset indices in batch order; `first`: group index of items[0] (a run's items are
    consecutive in its group); `sizes`: items per batch.
    """

    items: np.ndarray
    first: int
    sizes: list[int]


class Layout:
    """Where every real token of a run comes from (group row) and goes (flat padded row)."""

    def __init__(self, run: Run, lengths: np.ndarray, offset: np.ndarray):
        m, k = len(run.items), len(run.sizes)
        self.lengths = lengths[run.items]
        sizes = np.asarray(run.sizes, dtype=np.int64)
        self.item0 = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)  # first item of each batch
        self.widths = np.maximum.reduceat(self.lengths, self.item0)
        rows = sizes * self.widths
        self.row0 = np.r_[0, np.cumsum(rows)[:-1]].astype(np.int64)
        self.total = int(rows.sum())
        batch = np.repeat(np.arange(k), sizes)
        rowbase = self.row0[batch] + (np.arange(m) - self.item0[batch]) * self.widths[batch]
        self.n = int(self.lengths.sum())
        self.rep = np.repeat(np.arange(m), self.lengths)  # item of each real token
        self.j = np.arange(self.n) - np.repeat(np.cumsum(self.lengths) - self.lengths, self.lengths)
        self.dst = rowbase[self.rep] + self.j
        self.src = offset[run.first : run.first + m][self.rep] + self.j
        self.tok0 = np.r_[0, np.cumsum(self.lengths)][self.item0]  # first real token of each batch
        self.sizes, self.items = run.sizes, run.items

    def padded_source(self, zero: int) -> np.ndarray:
        """For every padded row: its group row, or `zero` for padding."""
        full = np.full(self.total, zero, dtype=np.int64)
        full[self.dst] = self.src
        return full

    def split(self, flat: dict[str, Any], per_item: dict[str, Any], keys: list[str]) -> list[dict[str, Any]]:
        """The run's batches: views [B, L, ...] of the flat padded tensors, slices of per-item ones."""
        out = []
        for t, b in enumerate(self.sizes):
            r0, w, i0 = int(self.row0[t]), int(self.widths[t]), int(self.item0[t])
            batch: dict[str, Any] = {}
            for name, v in flat.items():
                if name == "keys":
                    batch["keys"] = keys[i0 : i0 + b]
                elif isinstance(v, list):  # per-batch values ("other" label fields)
                    batch[name] = v[t]
                elif name in per_item:
                    batch[name] = v[i0 : i0 + b]
                else:
                    batch[name] = v[r0 : r0 + b * w].view(b, w, *v.shape[1:])
            out.append(batch)
        return out


class Assembler:
    """Lays out runs of batches for one Loader epoch (host or device), keeping its settings."""

    def __init__(self, *, dataset: Any, codec: Codec | None, dtype: torch.dtype, pad_token_id: int,
                 label_pad: int, device: torch.device, pin: bool, on_device: bool):
        self.ds, self.codec, self.dtype = dataset, codec, dtype
        self.pad_token_id, self.label_pad = pad_token_id, label_pad
        self.device, self.pin, self.on_device = device, pin, on_device
        self.labels = dataset.label_columns()
        self.keys = dataset.item_keys()
        self.d = dataset.hidden_size

    # -- the parts both paths share ------------------------------------------------------------
    def _label_arrays(self, lay: Layout) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list]]:
        """Per-item label columns [m], per-token ones as (values [n] of the real tokens), and
        per-batch "other" fields."""
        scalars: dict[str, np.ndarray] = {}
        tokens: dict[str, np.ndarray] = {}
        other: dict[str, list] = {}
        if self.labels is None:
            return scalars, tokens, other
        for name in self.labels.names:
            kind, values = self.labels.kinds[name], self.labels.values[name]
            if kind == "scalar":
                scalars[name] = values[lay.items]
            elif kind == "token":
                tokens[name] = values[self.labels.offsets[name][lay.items][lay.rep] + lay.j]
            else:
                other[name] = [pad_field([values[i] for i in lay.items[i0 : i0 + b].tolist()],
                                         lay.lengths[i0 : i0 + b].tolist(), int(w), self.label_pad)
                               for i0, b, w in zip(lay.item0.tolist(), lay.sizes, lay.widths.tolist())]
        return scalars, tokens, other

    def _decode_groups(self, lay: Layout, rows: GroupRows) -> list[tuple[int, np.ndarray]]:
        """(slot index, token positions in the run) per decode call: all tokens at once for lossless
        codecs; per build otherwise; per batch and build for codecs that are not row-independent
        (the rows `Collate` decoded together before, so the bits are the same)."""
        if rows.lossless:
            return [(0, np.arange(lay.n))]
        slot = rows.slot_of(lay.src)
        spans = [(0, lay.n)] if row_independent(self.codec) else \
            list(zip(lay.tok0.tolist(), [*lay.tok0[1:].tolist(), lay.n]))
        out = []
        for a, b in spans:
            for k in dict.fromkeys(slot[a:b].tolist()):
                out.append((k, a + np.flatnonzero(slot[a:b] == k)))
        return out

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin and not self.on_device)

    # -- host ------------------------------------------------------------------------------------
    def host(self, run: Run, rows: GroupRows) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """The run's batches as CPU tensors (pinned when a device copy follows); and the flat tensors."""
        lay = Layout(run, self.ds.lengths, rows.offset)
        group_index = torch.from_numpy(lay.padded_source(rows.zero))
        full = None
        if row_independent(self.codec):
            source = rows.source()
        else:  # decode batch by batch, build by build, on the rows decoded together before
            chunks, where = [], np.empty(lay.n, dtype=np.int64)
            at = 0
            for k, sel in self._decode_groups(lay, rows):
                local = lay.src[sel] - rows.bases[k]
                chunks.append(rows._decode({n: p[local] for n, p in rows.raw[k].items()}, k))
                where[sel] = at + np.arange(len(sel))
                at += len(sel)
            source = torchcodecs.as_tensor(_concat(chunks, zero_row=True))
            full = np.full(lay.total, at, dtype=np.int64)
            full[lay.dst] = where
        states = self._gather(source, group_index if full is None else torch.from_numpy(full), self.dtype)
        ids = self._gather(torch.from_numpy(rows.tokens), group_index, torch.long)
        mask = np.zeros(lay.total, dtype=np.int64)
        mask[lay.dst] = 1
        flat: dict[str, Any] = {"hidden_states": states.view(lay.total, self.d),
                                "attention_mask": self._pinned(torch.from_numpy(mask)), "input_ids": ids,
                                "keys": None, "boundaries": self._pinned(torch.from_numpy(self.ds.boundaries[lay.items]))}
        scalars, tokens, other = self._label_arrays(lay)
        for name in self.labels.names if self.labels else []:
            if name in scalars:
                flat[name] = self._pinned(torch.from_numpy(scalars[name]))
            elif name in tokens:
                padded = np.full(lay.total, self.label_pad, dtype=tokens[name].dtype)
                padded[lay.dst] = tokens[name]
                flat[name] = self._pinned(torch.from_numpy(padded))
            else:
                flat[name] = other[name]
        per_item = {"boundaries", *scalars}
        keys = [self.keys[i] for i in lay.items.tolist()]
        bases = [v for v in flat.values() if isinstance(v, torch.Tensor)]
        return lay.split(flat, per_item, keys), bases

    def _gather(self, source: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """source[index] as `dtype`: one gather, plus one casting copy when the dtypes differ."""
        if source.dtype == dtype:
            return torch.index_select(source, 0, index, out=self._empty((len(index), *source.shape[1:]), dtype))
        out = self._empty((len(index), *source.shape[1:]), dtype)
        return out.copy_(source.index_select(0, index))

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self.pin and not self.on_device else t

    # -- device ------------------------------------------------------------------------------------
    def device_run(self, run: Run, rows: GroupRows) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """The run's batches on `self.device`: one staging buffer, one copy, a few kernels."""
        lay = Layout(run, self.ds.lengths, rows.offset)
        pack = _Pack()
        groups = self._decode_groups(lay, rows)
        for g, (k, sel) in enumerate(groups):
            local = lay.src[sel] - (0 if rows.lossless else rows.bases[k])
            for name, part in rows.raw[k].items():
                pack.add(f"p{g}.{name}", part, local)
            pack.add(f"d{g}", lay.dst[sel])
        pack.add("tokens", rows.tokens, lay.src)
        pack.add("dst", lay.dst)
        pack.add("boundaries", self.ds.boundaries[lay.items])
        scalars, tokens, other = self._label_arrays(lay)
        for name, values in {**scalars, **tokens}.items():
            pack.add(f"l.{name}", values)
        dev = pack.to(self.device, pin=self.pin)  # the run's one host-to-device copy
        states = torch.zeros(lay.total, self.d, dtype=self.dtype, device=self.device)
        for g, (k, _) in enumerate(groups):
            parts = {name: dev[f"p{g}.{name}"] for name in rows.raw[k]}
            params = rows.params.get(rows.slots[k], {}) if not rows.lossless else {}
            decoded = torchcodecs.decode(self.codec, parts, params) if self.codec is not None else \
                parts["states"]
            states.index_copy_(0, dev[f"d{g}"], decoded.to(self.dtype))
        dst = dev["dst"]
        ids = torch.full((lay.total,), self.pad_token_id, dtype=torch.long, device=self.device)
        ids.index_copy_(0, dst, dev["tokens"].to(torch.long))
        mask = torch.zeros(lay.total, dtype=torch.long, device=self.device).index_fill_(0, dst, 1)
        flat: dict[str, Any] = {"hidden_states": states, "attention_mask": mask, "input_ids": ids, "keys": None,
                                "boundaries": dev["boundaries"]}
        for name in self.labels.names if self.labels else []:
            if name in scalars:
                flat[name] = dev[f"l.{name}"]
            elif name in tokens:
                values = dev[f"l.{name}"]
                padded = torch.full((lay.total,), self.label_pad, dtype=values.dtype, device=self.device)
                flat[name] = padded.index_copy_(0, dst, values)
            else:
                flat[name] = other[name]
        per_item = {"boundaries", *scalars}
        keys = [self.keys[i] for i in lay.items.tolist()]
        bases = [v for v in flat.values() if isinstance(v, torch.Tensor)]
        return lay.split(flat, per_item, keys), bases


class _Pack:
    """Arrays gathered into one byte buffer (16-byte aligned segments), copied to a device at once."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, np.ndarray, np.ndarray | None, int, tuple[int, ...], np.dtype]] = []
        self.size = 0

    def add(self, name: str, source: np.ndarray, index: np.ndarray | None = None) -> None:
        """Add `source[index]` (rows; all of `source` when index is None) as segment `name`."""
        rows = len(source) if index is None else len(index)
        shape = (rows, *source.shape[1:])
        nbytes = int(np.prod(shape, dtype=np.int64)) * source.dtype.itemsize
        self.entries.append((name, source, index, self.size, shape, source.dtype))
        self.size += -(-nbytes // 16) * 16

    def to(self, device: torch.device, *, pin: bool) -> dict[str, torch.Tensor]:
        host = torch.empty(max(self.size, 16), dtype=torch.uint8, pin_memory=pin)
        buf = host.numpy()
        for _, source, index, at, shape, dtype in self.entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            dst = buf[at : at + nbytes].view(_raw(dtype)).reshape(shape)
            src = source.view(_raw(dtype)) if source.dtype.name == "bfloat16" else source
            if index is None:
                dst[...] = src
            else:
                np.take(src, index, axis=0, out=dst, mode="clip")  # "raise" would buffer `out`
        moved = host.to(device, non_blocking=pin)
        out = {}
        for name, _, _, at, shape, dtype in self.entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            out[name] = moved[at : at + nbytes].view(_TORCH[dtype.name]).view(shape)
        return out


def _raw(dtype: np.dtype) -> np.dtype:
    """A numpy dtype numpy can copy for `dtype` (ml_dtypes' bfloat16 travels as its 16-bit pattern)."""
    return np.dtype(np.uint16) if dtype.name == "bfloat16" else dtype
