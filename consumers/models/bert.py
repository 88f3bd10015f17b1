"""BERT tail (also MiniLM and every BertModel checkpoint): `encoder.layer[k:]` (+ the pooler).

Each BertLayer takes (hidden_states, mask4d) and returns a Tensor; the 4-D mask is built the way
BertModel builds it (`create_bidirectional_mask`, which follows the config's attention
implementation), so fp32 outputs are bit-identical to BertModel's last_hidden_state.
The pretrained pooler is kept (small) so a BERT-style sequence head can start from it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import Container, Tail, keep_layers


class BertTail(Tail):
    family = "bert"
    hf_prefix = "bert"
    sequence_head = "bert"
    adapter_points = ("attention.output.dense", "output.dense")
    lora_targets = ("query", "value")

    def __init__(self, config: Any, first_layer: int, layers: Any, pooler: nn.Module | None = None):
        super().__init__(config, first_layer)
        self.encoder = Container()
        self.encoder.layer = keep_layers(layers, first_layer)
        self.pooler = pooler

    @classmethod
    def from_model(cls, model: Any, first_layer: int) -> BertTail:
        return cls(model.config, first_layer, model.encoder.layer, getattr(model, "pooler", None))

    def layers(self) -> list[nn.Module]:
        return list(self.encoder.layer.values())

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        h, am = self.prepare(hidden_states, attention_mask)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=am)
        for layer in self.encoder.layer.values():
            h = layer(h, mask)
        return h
