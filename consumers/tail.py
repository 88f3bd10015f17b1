"""Loading the reduced model's body: layers k..N-1 of a transformer, run on stored hidden_states[k].

`load_tail(store)` loads the model named in the store's recipe, checks that its weights and
layer count are the ones the store was built with, and keeps only what layers k..N-1 need
(no embeddings, no lower layers). A `Tail` (consumers.base) maps (hidden_states [B, L, d],
attention_mask [B, L]) to the model's last hidden state, calling the transformers layer modules
themselves, so a float32 store reproduces the full model's output bit for bit. Which Tail class
serves a recipe's model_type is `consumers.registry`'s business. Not here: heads
(consumers.heads), adapters (consumers.adapters), training (consumers.train).
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from .base import Container, Tail, keep_layers
from .registry import tail_class
from erstore.errors import IncompatibleStoreError
from erstore.manifest import Recipe

__all__ = ["Container", "Tail", "keep_layers", "load_tail"]


def load_tail(source: Any, *, model: str | None = None, device: str = "cpu", dtype: str = "float32") -> Tail:
    """Load the tail (layers k..N-1) that consumes a store built at layer k.

    Args:
        source: an `erstore.Store` or its `Recipe`.
        model: load the weights from here instead of the recipe's model_name (e.g. a local copy);
            they must still be the weights the store was built with.
        dtype: the tail's compute dtype; stored states are cast to it.

    Raises:
        IncompatibleStoreError: the model's weights fingerprint, layer count or hidden size
            differs from the recipe's (the stored states would not be this model's), or the
            family has no tail module.

    Example:
        >>> tail = load_tail(erstore.open("stores/minilm-l3"))
        >>> last = tail(hidden_states, attention_mask)
    """
    from erstore.model import LayerExtractor

    recipe: Recipe = getattr(source, "recipe", source)
    cls = tail_class(recipe.model_type)
    name = model or recipe.model_name
    # The extractor loads exactly as the build did (same class, dtype, attention implementation),
    # so its fingerprint is comparable with the recipe's.
    extractor = LayerExtractor(name, device=device)
    found = {"model_fingerprint": extractor.fingerprint, "num_layers": extractor.num_layers,
             "hidden_size": extractor.hidden_size, "model_type": extractor.config.model_type}
    for field, value in found.items():
        expected = getattr(recipe, field)
        if value != expected:
            raise IncompatibleStoreError(
                f"model {name!r} has {field}={value!r}, but the store was built with "
                f"{field}={expected!r} (model {recipe.model_name!r}, layer {recipe.layer}); its "
                "stored states are not this model's. Load the model the store was built with, "
                "or build a store with this model"
            )
    if not 0 <= recipe.layer <= extractor.num_layers:
        raise IncompatibleStoreError(
            f"the store's layer {recipe.layer} is outside 0..{extractor.num_layers} of {name!r}"
        )
    full = sum(p.numel() for p in extractor.model.parameters())
    tail = cls.from_model(extractor.model, recipe.layer)
    del extractor
    gc.collect()  # the embeddings and lower layers go now, not at some later collection
    tail.recipe = recipe
    tail.full_parameters = full
    return tail.to(device=device, dtype=getattr(torch, dtype)).eval()
