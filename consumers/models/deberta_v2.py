"""DeBERTa-v2/v3 tail: `encoder.layer[k:]` with disentangled relative attention.

The tail keeps the encoder module (relative embeddings, their LayerNorm, and the optional
convolution) and calls its own helpers for the mask (`get_attention_mask`), relative positions
(`get_rel_pos`) and relative embeddings (`get_rel_embedding`). With `conv_kernel_size > 0` the
encoder mixes a convolution of the embedding output into layer 0's output; hidden_states[1] is
taken after it, so only a tail starting at layer 0 runs the convolution (on its input). Models
with `z_steps > 1` (an extra repeated last layer, used by none of the released checkpoints) are
not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import Tail, keep_layers


class DebertaV2Tail(Tail):
    family = "deberta-v2"
    hf_prefix = "deberta"
    sequence_head = "deberta"
    adapter_points = ("attention.output.dense", "output.dense")
    lora_targets = ("query_proj", "value_proj")

    def __init__(self, config: Any, first_layer: int, encoder: nn.Module):
        super().__init__(config, first_layer)
        encoder.layer = keep_layers(encoder.layer, first_layer)
        if first_layer > 0:
            encoder.conv = None  # already applied to the stored hidden_states[1]
        self.encoder = encoder

    @classmethod
    def from_model(cls, model: Any, first_layer: int) -> DebertaV2Tail:
        return cls(model.config, first_layer, model.encoder)

    def layers(self) -> list[nn.Module]:
        return list(self.encoder.layer.values())

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h, am = self.prepare(hidden_states, attention_mask)
        enc = self.encoder
        mask = enc.get_attention_mask(am)
        relative_pos = enc.get_rel_pos(h)
        rel_embeddings = enc.get_rel_embedding()
        first = h
        for index, layer in enc.layer.items():
            h = layer(h, mask, relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]
            if index == "0" and enc.conv is not None:
                h = enc.conv(first, h, am)
        return h
