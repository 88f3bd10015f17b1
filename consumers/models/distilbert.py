"""DistilBERT tail: `transformer.layer[k:]`; each TransformerBlock takes (hidden, mask4d) and
returns a Tensor. DistilBERT has no pooler; its sequence head is `pre_classifier` + ReLU +
`classifier` on the first token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import Container, Tail, keep_layers


class DistilBertTail(Tail):
    family = "distilbert"
    hf_prefix = "distilbert"
    sequence_head = "distilbert"
    adapter_points = ("attention.out_lin", "ffn.lin2")
    lora_targets = ("q_lin", "v_lin")

    def __init__(self, config: Any, first_layer: int, layers: Any):
        super().__init__(config, first_layer)
        self.transformer = Container()
        self.transformer.layer = keep_layers(layers, first_layer)

    @classmethod
    def from_model(cls, model: Any, first_layer: int) -> DistilBertTail:
        return cls(model.config, first_layer, model.transformer.layer)

    def layers(self) -> list[nn.Module]:
        return list(self.transformer.layer.values())

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        h, am = self.prepare(hidden_states, attention_mask)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=am)
        for layer in self.transformer.layer.values():
            h = layer(h, mask)
        return h
