"""The reduced model's body: layers k..N-1 of a transformer, run on stored hidden_states[k].

`load_tail(store)` loads the model named in the store's recipe, checks that its weights and
layer count are the ones the store was built with, and keeps only what layers k..N-1 need
(no embeddings, no lower layers). A `Tail` maps (hidden_states [B, L, d], attention_mask
[B, L]) to the model's last hidden state, calling the transformers layer modules themselves,
so a float32 store reproduces the full model's output bit for bit.

Parameter names of a tail are the transformers base model's names (`encoder.layer.3....`), so
weights move between a tail and a transformers checkpoint by name. Not here: heads
(consumers.heads), adapters (consumers.adapters), training (consumers.train).
"""

from __future__ import annotations

import gc
from typing import Any, ClassVar

import torch
from torch import nn

from erstore.errors import IncompatibleStoreError
from erstore.manifest import Recipe


class Container(nn.Module):
    """A plain module holding submodules under transformers' attribute names."""


def keep_layers(layers: Any, first: int) -> nn.ModuleDict:
    """Layers first..N-1 under their original indices, so parameter names match transformers."""
    return nn.ModuleDict({str(i): layers[i] for i in range(first, len(layers))})


class Tail(nn.Module):
    """Layers k..N-1 of one model family. Subclasses set the class attributes and two methods."""

    family: ClassVar[str]
    #: base_model_prefix of transformers' task models (BertForSequenceClassification.bert ...).
    hf_prefix: ClassVar[str]
    #: style of transformers' sequence-classification head for this family (see consumers.heads).
    sequence_head: ClassVar[str]
    #: Linear modules, relative to one layer, whose output gets a Houlsby adapter:
    #: the attention output projection and the feed-forward output projection.
    adapter_points: ClassVar[tuple[str, str]]
    #: default LoRA targets (attention query and value projections).
    lora_targets: ClassVar[tuple[str, ...]]

    def __init__(self, config: Any, first_layer: int):
        super().__init__()
        self.config = config
        self.first_layer = first_layer
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.recipe: Recipe | None = None
        self.full_parameters = 0  # of the whole model it was cut from (set by load_tail)

    @classmethod
    def from_model(cls, model: Any, first_layer: int) -> Tail:
        """Take layers first_layer.. (and what they need) from a loaded transformers model."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state [B, L, d] from hidden_states[k] [B, L, d] and a 0/1 mask [B, L]."""
        raise NotImplementedError

    def layers(self) -> list[nn.Module]:
        """The kept transformer layers, in order (layer k first)."""
        raise NotImplementedError

    def prepare(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cast stored states to the tail's dtype and default the mask to all ones."""
        dtype = next(self.parameters(), torch.empty(0)).dtype
        hidden_states = hidden_states.to(dtype)
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        return hidden_states, attention_mask

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict[str, Any]:
        """Sizes for people: parameters kept vs the full model, and the bytes saved."""
        kept = self.num_parameters()
        itemsize = next(self.parameters()).element_size() if kept else 4
        return {"family": self.family, "layers": f"{self.first_layer}..{self.num_layers - 1}",
                "parameters": kept, "full_parameters": self.full_parameters,
                "saved_parameters": self.full_parameters - kept,
                "saved_bytes": (self.full_parameters - kept) * itemsize}


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
    from consumers.registry import tail_class

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
