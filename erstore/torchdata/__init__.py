"""The bridge to PyTorch: a map-style `StoreDataset`, a picklable `Collate`, and a prefetching `Loader`.

The only erstore package that imports torch's data utilities (`import erstore` does not import
torch; `Store.dataset()` / `Store.loader()` import this package when called). Items and batches
use the names transformers models expect:

    item:  hidden_states [L, d] float, input_ids [L], key, boundary, plus label fields
    batch: hidden_states [B, L, d], attention_mask [B, L], input_ids [B, L], keys, labels...

Modules, one responsibility each:
    dataset.py   StoreDataset: items, process safety (forked / spawned DataLoader workers)
    collate.py   Collate (per item, for DataLoader) and LabelColumns (label fields as arrays)
    assemble.py  GroupRows (where a read group's stored parts arrive) and the vectorised layout
                 of runs of batches, on the host or on the device
    producer.py  the background thread: read groups one ahead, runs of batches into a queue
    process.py   the same in a spawned child process, runs in shared-memory slots (producer="process")
    loader.py    Loader and its epoch iterator (the consumer side)
Not here: model code, tokenisation (see erstore.labels), multi-store mixing.
"""

from __future__ import annotations

from erstore.torchdata.collate import LABEL_PAD, Collate, real_rows
from erstore.torchdata.dataset import StoreDataset
from erstore.torchdata.loader import Loader
from erstore.torchdata.producer import read_groups

__all__ = ["LABEL_PAD", "Collate", "Loader", "StoreDataset", "read_groups", "real_rows"]
