"""GPT-2 tail: `h[k:]` + `ln_f`, parameter names as in GPT2Model.

GPT-2 adds learned position embeddings (`wpe`) before block 0, so stored states already carry
positions and the blocks need only the causal mask (`create_causal_mask`, as GPT2Model builds
it). Its projections are `Conv1D` (weights stored transposed), hence LoRA with fan_in_fan_out
and adapters sized by `nf`. Sequence classification pools the last real token (`score`), as
GPT2ForSequenceClassification does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import Tail
from .decoder import positions, take_layers


class GPT2Tail(Tail):
    family = "gpt2"
    hf_prefix = "transformer"
    sequence_head = "last"
    adapter_points = ("attn.c_proj", "mlp.c_proj")
    lora_targets = ("c_attn",)
    lora_fan_in_fan_out = True  # Conv1D

    def __init__(self, config: Any, first_layer: int, model: nn.Module):
        super().__init__(config, first_layer)
        self.h = take_layers(model, first_layer, "h")
        self.ln_f = model.ln_f

    @classmethod
    def from_model(cls, model: Any, first_layer: int) -> GPT2Tail:
        return cls(model.config, first_layer, model)

    def layers(self) -> list[nn.Module]:
        return self.h()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        h, am = self.prepare(hidden_states, attention_mask)
        if self.first_layer == self.num_layers:
            return h  # hidden_states[N] is after ln_f already
        if position_ids is None:
            position_ids = positions(am)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=am, cache=None,
                                  position_ids=position_ids)
        for block in self.h.values():
            h = block(h, None, mask, None, use_cache=False, position_ids=position_ids)
        return self.ln_f(h)
