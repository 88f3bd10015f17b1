"""Batch assembly: padded batches laid out from a read group's rows with a few vectorised gathers.

The Loader reads consecutive batches in read groups (one storage read each). `GroupRows` is where a
read group's raw stored parts arrive from storage: the spans of one `PendingRead`, concatenated
(per build for lossy codecs, all builds together for lossless ones; a group read as one span is
used as it arrived, without a copy), so that every token of every batch is "row `i` of the
group". `Layout` computes, once per group, where every token comes from and goes; a run of
consecutive batches (a `Cut` of it) is then materialised at once:

- host: one `index_select` of the group's decoded rows into the run's padded [sum B*L, d] buffer
  (plus a casting copy from a reused scratch buffer) and one `index_fill_` that zeroes its
  padding rows; token ids, mask and label columns are views of arrays laid out once per group.
  Batches are views of these buffers.
- device: the run's stored codes (padded, or only its real rows when padding is heavy or the
  codec lossy), its mask, padded token ids, boundaries and label columns are gathered into ONE
  (pinned) staging buffer, copied to the device with one host-to-device copy, and decoded and
  placed there by 1-4 kernels per run (one cast for a lossless store with little padding),
  whatever the batch size or number of sequences.

Python work per run is a constant number of numpy/torch calls, not a loop over sequences, so the
prefetch thread needs the GIL for a few short stretches per run.
Values are those `Collate` produces from `store.read`: same decode per row (int4's rotation, a
BLAS product, is decoded batch by batch on exactly the rows it was before), same casts.
Not here: the order of batches (erstore.shuffle), threads and queues (producer.py, loader.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from erstore import torchcodecs
from erstore.codecs import Codec, Int4Codec
from erstore.torchdata.collate import pad_field

# Lossless runs with at least this fraction of real rows are copied to the device padded.
PADDED_FRACTION = 0.75
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
          "int64": torch.int64, "bool": torch.bool}


# Host runs of wide rows that are mostly padding (shuffled batches are ~3x wider than their mean
# length) are copied item by item: on the default MiniLM store a shuffled epoch took 0.19-0.22 s
# instead of 0.22-0.23 s with the gather (interleaved A/B, quiet machine; ba5c11f: 0.18-0.19 s).
PER_ITEM_MIN_D = 128
PER_ITEM_PAD_FRACTION = 0.25


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
    Attributes: `offset[i]` is the group row of sequence i's first token; `tokens[zero]` is the
    padding token id (appended after the group's token ids).
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
        if self.lossless:  # parameters play no part: one row space for all builds
            flat = [p for slot_pieces in pieces for p in slot_pieces]
            self.raw = [{n: _concat([p[n] for p in flat]) for n in names}]
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
        """Decoded rows of the whole group, [rows, d] (stored dtype for lossless
        codecs, float32 otherwise); decoded once per group (row-independent codecs only)."""
        if self._source is None:
            if self.lossless:
                self._source = torchcodecs.as_tensor(self._decode(self.raw[0], 0))
            else:
                decoded = [self._decode(parts, k) for k, parts in enumerate(self.raw)]
                self._source = torchcodecs.as_tensor(_concat(decoded))
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


class Layout:
    """Where every real token of a read group's batches comes from (group row) and goes (flat
    padded row, batch after batch), computed once per group with a few numpy calls; runs of
    batches are slices of it (`cut`), so a run costs no per-token index work on the host path."""

    def __init__(self, batches: Sequence[np.ndarray], lengths: np.ndarray, rows: GroupRows):
        self.items = np.concatenate(batches)
        m, k = len(self.items), len(batches)
        self.lengths = lengths[self.items]
        self.sizes = np.array([len(b) for b in batches], dtype=np.int64)
        self.item0 = np.r_[0, np.cumsum(self.sizes)].astype(np.int64)  # first item of each batch, + end
        self.widths = np.maximum.reduceat(self.lengths, self.item0[:-1])
        self.row0 = np.r_[0, np.cumsum(self.sizes * self.widths)].astype(np.int64)
        batch = np.repeat(np.arange(k), self.sizes)
        rowbase = self.row0[batch] + (np.arange(m) - self.item0[batch]) * self.widths[batch]
        self.n = int(self.lengths.sum())
        self.tok_start = np.r_[0, np.cumsum(self.lengths)].astype(np.int64)  # first token of each item, + end
        self.rep = np.repeat(np.arange(m), self.lengths)  # item of each real token
        self.j = np.arange(self.n) - self.tok_start[self.rep]
        self.dst = rowbase[self.rep] + self.j
        self.src = rows.offset[self.rep] + self.j
        self.full = np.full(int(self.row0[-1]), rows.zero, dtype=np.int64)  # group row of every padded row
        self.full[self.dst] = self.src
        real = self.full != rows.zero
        self.mask = real.astype(np.int64)
        self.pad = np.flatnonzero(~real)  # padded rows, zeroed after the states' gather
        self.states_index = self.full.copy()
        self.states_index[self.pad] = 0  # any real row: overwritten with zeros

    def runs(self, batches: int, rows: int) -> list[tuple[int, int]]:
        """Consecutive batches cut into runs of at most `batches` batches and `rows` padded rows
        (a longer batch stands alone), as (first batch, end batch)."""
        out, start = [], 0
        padded = (self.sizes * self.widths).tolist()
        size = 0
        for t, p in enumerate(padded):
            if t > start and (t - start == batches or size + p > rows):
                out.append((start, t))
                start, size = t, 0
            size += p
        if padded:
            out.append((start, len(padded)))
        return out

    def cut(self, t0: int, t1: int) -> Cut:
        return Cut(self, t0, t1)


class Cut:
    """Batches t0..t1-1 of a `Layout`: item, token and padded-row ranges, and relative offsets."""

    def __init__(self, lay: Layout, t0: int, t1: int):
        self.lay, self.t0, self.t1 = lay, t0, t1
        self.i0, self.i1 = int(lay.item0[t0]), int(lay.item0[t1])
        self.r0, self.r1 = int(lay.row0[t0]), int(lay.row0[t1])
        self.n0, self.n1 = int(lay.tok_start[self.i0]), int(lay.tok_start[self.i1])
        self.total, self.n = self.r1 - self.r0, self.n1 - self.n0
        self.items = lay.items[self.i0 : self.i1]

    @property
    def pad(self) -> np.ndarray:
        """Padding rows of the run, relative to its first padded row."""
        lo, hi = np.searchsorted(self.lay.pad, [self.r0, self.r1])
        return self.lay.pad[lo:hi] - self.r0

    @property
    def src(self) -> np.ndarray:
        return self.lay.src[self.n0 : self.n1]

    @property
    def dst(self) -> np.ndarray:
        """Padded row of each real token, relative to the run's first padded row."""
        return self.lay.dst[self.n0 : self.n1] - self.r0

    def batch_tokens(self) -> list[tuple[int, int]]:
        """Each batch's range of real tokens, relative to the run."""
        starts = self.lay.tok_start[self.lay.item0[self.t0 : self.t1 + 1]] - self.n0
        return list(zip(starts[:-1].tolist(), starts[1:].tolist()))

    def split(self, flat: dict[str, Any], per_item: set[str], keys: list[str]) -> list[dict[str, Any]]:
        """The run's batches: views [B, L, ...] of its flat padded tensors, slices of per-item ones."""
        lay = self.lay
        out = []
        sizes = lay.sizes[self.t0 : self.t1].tolist()
        rows = (lay.row0[self.t0 : self.t1] - self.r0).tolist()
        items = (lay.item0[self.t0 : self.t1] - self.i0).tolist()
        for t, (b, w, r0, i0) in enumerate(zip(sizes, lay.widths[self.t0 : self.t1].tolist(), rows, items)):
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


class GroupLabels:
    """A group's label fields laid out once: per item, per padded row, or per batch ("other")."""

    def __init__(self, columns: Any, lay: Layout, label_pad: int):
        self.per_item: dict[str, np.ndarray] = {}
        self.per_row: dict[str, np.ndarray] = {}  # padded with label_pad
        self.per_token: dict[str, np.ndarray] = {}  # values of the real tokens, in layout order
        self.other: dict[str, list] = {}
        self.names = list(columns.names) if columns is not None else []
        for name in self.names:
            kind, values = columns.kinds[name], columns.values[name]
            if kind == "scalar":
                self.per_item[name] = values[lay.items]
            elif kind == "token":
                tokens = values[columns.offsets[name][lay.items][lay.rep] + lay.j]
                self.per_token[name] = tokens
                padded = np.full(len(lay.full), label_pad, dtype=tokens.dtype)
                padded[lay.dst] = tokens
                self.per_row[name] = padded
            else:
                self.other[name] = [pad_field([values[i] for i in lay.items[a:b].tolist()],
                                              lay.lengths[a:b].tolist(), int(w), label_pad)
                                    for a, b, w in zip(lay.item0[:-1].tolist(), lay.item0[1:].tolist(),
                                                       lay.widths.tolist())]


class Assembler:
    """Lays out a Loader epoch's batches, run by run (host or device), keeping its settings."""

    def __init__(self, *, dataset: Any, codec: Codec | None, dtype: torch.dtype, pad_token_id: int,
                 label_pad: int, device: torch.device, pin: bool, on_device: bool):
        self.ds, self.codec, self.dtype = dataset, codec, dtype
        self.pad_token_id, self.label_pad = pad_token_id, label_pad
        self.device, self.pin, self.on_device = device, pin, on_device
        self.labels = dataset.label_columns()
        self.keys = dataset.item_keys()
        self.d = dataset.hidden_size
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        # Where a host run's states are allocated (None: fresh memory). The process producer
        # (erstore.torchdata.process) points it at the shared-memory slot the run goes to.
        self.alloc: Any = None

    def group(self, batches: Sequence[np.ndarray], rows: GroupRows) -> Group:
        """Everything of a read group that is laid out once for all its batches."""
        return Group(self, batches, rows)

    def _decode_groups(self, cut: Cut, rows: GroupRows) -> list[tuple[int, np.ndarray]]:
        """(slot index, token positions in the run) per decode call: all tokens at once for lossless
        codecs; per build otherwise; per batch and build for codecs that are not row-independent
        (the rows `Collate` decoded together before, so the bits are the same)."""
        if rows.lossless:
            return [(0, np.arange(cut.n))]
        slot = rows.slot_of(cut.src)
        spans = [(0, cut.n)] if row_independent(self.codec) else cut.batch_tokens()
        out = []
        for a, b in spans:
            for k in dict.fromkeys(slot[a:b].tolist()):
                out.append((k, a + np.flatnonzero(slot[a:b] == k)))
        return out

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.alloc is not None and not self.on_device:
            return self.alloc(shape, dtype)
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin and not self.on_device)

    def _gather(self, source: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """source[index] as `dtype`: one gather, plus one casting copy when the dtypes differ."""
        shape = (len(index), *source.shape[1:])
        if source.dtype == dtype:
            return torch.index_select(source, 0, index, out=self._empty(shape, dtype))
        # The stored-dtype rows go through a scratch buffer this thread reuses: fresh memory
        # costs a page fault per 4 KiB, about as much as the copy itself.
        need = int(np.prod(shape))
        scratch = self._scratch.get(source.dtype)
        if scratch is None or scratch.numel() < need:
            scratch = self._scratch[source.dtype] = torch.empty(max(need, 1 << 16), dtype=source.dtype)
        gathered = torch.index_select(source, 0, index, out=scratch[:need].view(shape))
        return self._empty(shape, dtype).copy_(gathered)


class Group:
    """One read group's layout and label arrays, and its runs' batches (host or device)."""

    def __init__(self, asm: Assembler, batches: Sequence[np.ndarray], rows: GroupRows):
        self.asm, self.rows = asm, rows
        self.lay = Layout(batches, asm.ds.lengths, rows)
        self.labels = GroupLabels(asm.labels, self.lay, asm.label_pad)
        self.keys = [asm.keys[i] for i in self.lay.items.tolist()]
        self.boundaries = asm.ds.boundaries[self.lay.items]
        self.ids = rows.tokens.astype(np.int64)[self.lay.full]  # padded token ids of every batch
        pin = asm.pin and not asm.on_device
        as_t = (lambda a: torch.from_numpy(a).pin_memory()) if pin else torch.from_numpy
        self.host = {"full": torch.from_numpy(self.lay.full), "states_index": torch.from_numpy(self.lay.states_index),
                     "attention_mask": as_t(self.lay.mask),
                     "boundaries": as_t(self.boundaries), "input_ids": as_t(self.ids), **{n: as_t(v) for n, v in self.labels.per_item.items()},
                     **{n: as_t(v) for n, v in self.labels.per_row.items()}}

    def runs(self, batches: int, rows: int) -> list[Cut]:
        return [self.lay.cut(a, b) for a, b in self.lay.runs(batches, rows)]

    # -- host ------------------------------------------------------------------------------------
    def host_run(self, cut: Cut) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """The run's batches as CPU tensors (pinned when a device copy follows); and their bases."""
        asm, rows = self.asm, self.rows
        pad = cut.pad
        if row_independent(asm.codec) and asm.d >= PER_ITEM_MIN_D and len(pad) > PER_ITEM_PAD_FRACTION * cut.total:
            states, pad = self._per_item(cut, rows.source()), pad[:0]
        elif row_independent(asm.codec):
            states = asm._gather(rows.source(), self.host["states_index"][cut.r0 : cut.r1], asm.dtype)
        else:  # decode batch by batch, build by build, on the rows decoded together before
            chunks, where, at = [], np.empty(cut.n, dtype=np.int64), 0
            for k, sel in asm._decode_groups(cut, rows):
                local = cut.src[sel] - rows.bases[k]
                chunks.append(rows._decode({n: p[local] for n, p in rows.raw[k].items()}, k))
                where[sel] = at + np.arange(len(sel))
                at += len(sel)
            full = np.zeros(cut.total, dtype=np.int64)
            full[cut.dst] = where
            states = asm._gather(torchcodecs.as_tensor(_concat(chunks)), torch.from_numpy(full), asm.dtype)
        if len(pad):
            states.index_fill_(0, torch.from_numpy(pad), 0)
        ids = self.host["input_ids"][cut.r0 : cut.r1]
        flat: dict[str, Any] = {"hidden_states": states.view(cut.total, asm.d),
                                "attention_mask": self.host["attention_mask"][cut.r0 : cut.r1], "input_ids": ids,
                                "keys": None, "boundaries": self.host["boundaries"][cut.i0 : cut.i1]}
        for name in self.labels.names:
            if name in self.labels.per_item:
                flat[name] = self.host[name][cut.i0 : cut.i1]
            elif name in self.labels.per_row:
                flat[name] = self.host[name][cut.r0 : cut.r1]
            else:
                flat[name] = self.labels.other[name][cut.t0 : cut.t1]
        per_item = {"boundaries", *self.labels.per_item}
        bases = [v for v in flat.values() if isinstance(v, torch.Tensor)]
        return cut.split(flat, per_item, self.keys[cut.i0 : cut.i1]), bases

    def _per_item(self, cut: Cut, source: torch.Tensor) -> torch.Tensor:
        """Mostly-padded runs of wide rows: per item one casting copy of its real rows and one
        zeroing of its padding, straight into the output (the gather path moves every padded row
        three times: gather, cast, zero fill). Two torch calls per item: for d >= PER_ITEM_MIN_D
        the bytes, not the calls, are the cost."""
        lay = self.lay
        out = self.asm._empty((cut.total, self.asm.d), self.asm.dtype)
        first = lay.tok_start[cut.i0 : cut.i1]
        dst = (lay.dst[first] - cut.r0).tolist()
        src = lay.src[first].tolist()
        lengths = lay.lengths[cut.i0 : cut.i1].tolist()
        widths = np.repeat(lay.widths[cut.t0 : cut.t1], lay.sizes[cut.t0 : cut.t1]).tolist()
        for d0, s0, n, w in zip(dst, src, lengths, widths):
            out[d0 : d0 + n].copy_(source[s0 : s0 + n])
            if n < w:
                out[d0 + n : d0 + w].zero_()
        return out

    # -- device ------------------------------------------------------------------------------------
    def device_run(self, cut: Cut) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """The run's batches on the device: one staging buffer, one copy, 1-4 kernels for the states.

        Mask, padded token ids, boundaries and labels are laid out on the host (small) and only
        copied. Lossless codes with little padding travel padded (zeros included), so the device
        only decodes them (one cast); otherwise only the real rows travel, and the device zeroes,
        decodes and scatters them into place.
        """
        asm, rows = self.asm, self.rows
        pack = _Pack()
        padded = rows.lossless and cut.n >= PADDED_FRACTION * cut.total
        groups = [] if padded else asm._decode_groups(cut, rows)
        if padded:
            index = self.lay.states_index[cut.r0 : cut.r1]
            for name, part in rows.raw[0].items():
                pack.add(f"p.{name}", part, index, zero=cut.pad)
        else:
            src, dst = cut.src, cut.dst
            for g, (k, sel) in enumerate(groups):
                local = src[sel] - (0 if rows.lossless else rows.bases[k])
                for name, part in rows.raw[k].items():
                    pack.add(f"p{g}.{name}", part, local)
                pack.add(f"d{g}", dst[sel])
        pack.add("attention_mask", self.lay.mask[cut.r0 : cut.r1])
        pack.add("input_ids", self.ids[cut.r0 : cut.r1])
        pack.add("boundaries", self.boundaries[cut.i0 : cut.i1])
        for name, values in self.labels.per_item.items():
            pack.add(f"l.{name}", values[cut.i0 : cut.i1])
        for name, values in self.labels.per_row.items():
            pack.add(f"l.{name}", values[cut.r0 : cut.r1])
        dev = pack.to(asm.device, pin=asm.pin)  # the run's one host-to-device copy
        if padded:
            parts = {name: dev[f"p.{name}"] for name in rows.raw[0]}
            decoded = parts["states"] if asm.codec is None else torchcodecs.decode(asm.codec, parts, {})
            states = decoded.to(asm.dtype)
        else:
            states = torch.zeros(cut.total, asm.d, dtype=asm.dtype, device=asm.device)
            for g, (k, _) in enumerate(groups):
                parts = {name: dev[f"p{g}.{name}"] for name in rows.raw[k]}
                params = {} if rows.lossless else rows.params.get(rows.slots[k], {})
                decoded = parts["states"] if asm.codec is None else torchcodecs.decode(asm.codec, parts, params)
                states.index_copy_(0, dev[f"d{g}"], decoded.to(asm.dtype))
        flat: dict[str, Any] = {"hidden_states": states, "attention_mask": dev["attention_mask"],
                                "input_ids": dev["input_ids"], "keys": None, "boundaries": dev["boundaries"]}
        for name in self.labels.names:
            if name in self.labels.per_item or name in self.labels.per_row:
                flat[name] = dev[f"l.{name}"]
            else:
                flat[name] = self.labels.other[name][cut.t0 : cut.t1]
        per_item = {"boundaries", *self.labels.per_item}
        bases = [v for v in flat.values() if isinstance(v, torch.Tensor)]
        return cut.split(flat, per_item, self.keys[cut.i0 : cut.i1]), bases


class _Pack:
    """Arrays gathered into one byte buffer (16-byte aligned segments), copied to a device at once."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, np.ndarray, np.ndarray | None, int, tuple[int, ...], np.dtype,
                                 np.ndarray | None]] = []
        self.size = 0

    def add(self, name: str, source: np.ndarray, index: np.ndarray | None = None, *,
            zero: np.ndarray | None = None) -> None:
        """Add `source[index]` (rows; all of `source` when index is None) as segment `name`, with
        rows `zero` of it set to zeros."""
        rows = len(source) if index is None else len(index)
        shape = (rows, *source.shape[1:])
        nbytes = int(np.prod(shape, dtype=np.int64)) * source.dtype.itemsize
        self.entries.append((name, source, index, self.size, shape, source.dtype, zero))
        self.size += -(-nbytes // 16) * 16

    def to(self, device: torch.device, *, pin: bool) -> dict[str, torch.Tensor]:
        host = torch.empty(max(self.size, 16), dtype=torch.uint8, pin_memory=pin)
        buf = host.numpy()
        for _, source, index, at, shape, dtype, zero in self.entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            dst = buf[at : at + nbytes].view(_raw(dtype)).reshape(shape)
            src = source.view(_raw(dtype)) if source.dtype.name == "bfloat16" else source
            if index is None:
                dst[...] = src
            else:
                np.take(src, index, axis=0, out=dst, mode="clip")  # "raise" would buffer `out`
            if zero is not None and len(zero):
                dst[zero] = 0
        moved = host.to(device, non_blocking=pin)
        out = {}
        for name, _, _, at, shape, dtype, _ in self.entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            out[name] = moved[at : at + nbytes].view(_TORCH[dtype.name]).view(shape)
        return out


def _raw(dtype: np.dtype) -> np.dtype:
    """A numpy dtype numpy can copy for `dtype` (ml_dtypes' bfloat16 travels as its 16-bit pattern)."""
    return np.dtype(np.uint16) if dtype.name == "bfloat16" else dtype
