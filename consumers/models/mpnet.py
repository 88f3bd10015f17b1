"""MPNet tail: `encoder.layer[k:]` plus the encoder's relative position bias table.

MPNetEncoder computes one position bias from the sequence length and passes it to every layer;
the tail keeps the encoder module (with only layers k..N-1) and calls its own
`compute_position_bias`, so the bias is the one the full model uses. Runs with eager attention
(the only implementation MPNet supports), as the build does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import Tail, keep_layers


class MPNetTail(Tail):
    family = "mpnet"
    hf_prefix = "mpnet"
    sequence_head = "roberta"  # MPNetClassificationHead: classifier.dense / classifier.out_proj
    adapter_points = ("attention.attn.o", "output.dense")
    lora_targets = ("q", "v")

    def __init__(self, config: Any, first_layer: int, encoder: nn.Module, pooler: nn.Module | None = None):
        super().__init__(config, first_layer)
        encoder.layer = keep_layers(encoder.layer, first_layer)
        self.encoder = encoder
        self.pooler = pooler

    @classmethod
    def from_model(cls, model: Any, first_layer: int) -> MPNetTail:
        return cls(model.config, first_layer, model.encoder, getattr(model, "pooler", None))

    def layers(self) -> list[nn.Module]:
        return list(self.encoder.layer.values())

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        h, am = self.prepare(hidden_states, attention_mask)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=am)
        position_bias = self.encoder.compute_position_bias(h)
        for layer in self.encoder.layer.values():
            h = layer(h, mask, position_bias)[0]
        return h
