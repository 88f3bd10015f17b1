"""Which module runs the tail of which model family.

A family module defines one `Tail` subclass; this table maps a transformers `model_type` (as
recorded in a store's recipe) to it. Adding a family means adding one file and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from erstore.errors import IncompatibleStoreError

if TYPE_CHECKING:
    from consumers.tail import Tail

FAMILIES: dict[str, str] = {
    "bert": "consumers.bert:BertTail",
    "roberta": "consumers.roberta:RobertaTail",
    "distilbert": "consumers.distilbert:DistilBertTail",
    "deberta-v2": "consumers.deberta_v2:DebertaV2Tail",
    "mpnet": "consumers.mpnet:MPNetTail",
    "t5": "consumers.t5:T5Tail",
}


def tail_class(model_type: str) -> type[Tail]:
    """The Tail subclass for a recipe's model_type; IncompatibleStoreError if there is none."""
    target = FAMILIES.get(model_type)
    if target is None:
        raise IncompatibleStoreError(
            f"no reduced-model tail for model_type {model_type!r}; supported: "
            f"{', '.join(sorted(FAMILIES))}. Add a module to consumers/ and a line to "
            "consumers.registry.FAMILIES"
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
