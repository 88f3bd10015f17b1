"""The `Tail` base class every model family implements, and two helpers for family modules.

A family module (consumers/models/<family>.py) subclasses `Tail`: `from_model` takes layers
k..N-1 (and what they need: final norm, position tables, rotary embeddings) from a loaded
transformers base model, `forward` runs them on stored hidden_states[k], `layers` lists them.
Parameter names of a tail are the transformers base model's names (`encoder.layer.3....`,
`layers.3....`), so weights move between a tail and a transformers checkpoint by name.

This module imports nothing else from `consumers`, so family modules, the registry and
`consumers.tail.load_tail` can all import it without an import circle. Not here: loading and
checking a model against a store (consumers.tail), which family serves which model_type
(consumers.registry), heads, adapters, training.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

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
