"""The shared tail of rotary decoder-only models (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3).

In transformers 5 these families share one shape: `layers` (decoder layers), `norm` (final RMS
norm) and `rotary_emb`; the base model's forward builds the position ids, one 4-D mask per
attention type (`create_causal_mask`, `create_sliding_window_causal_mask` from
transformers.masking_utils) and the rotary cos/sin once, then calls every layer with them.
`DecoderTail.forward` does exactly that from layer k on, so a float32 store gives the base
model's last_hidden_state bit for bit. What differs per family is a class attribute here:
which LoRA targets and adapter points, and whether rotary embeddings depend on the layer type
(Gemma 3: local and global RoPE). Gemma's sqrt(d) embedding scaling happens before layer 0, so
stored states already carry it; its attention soft-capping and query scaling live in the layer
modules, which run unchanged. Grouped-query attention likewise lives inside the layers.

Positions: a stored sequence is run from position 0 (see docs/decoders.md), so a token's
position is its index among the real tokens of its row: `cumsum(attention_mask) - 1`. That is
arange(L) for right padding and also right for left padding. Callers may pass position_ids.

Not here: the LM head (consumers.lm), task heads (consumers.heads), GPT-2
(consumers.models.gpt2: learned positions, Conv1D projections).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..base import Tail, keep_layers


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each real token within its row (0 for padding): what the build ran it at."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def layer_types(config: Any) -> list[str]:
    """The attention type of every layer, as the family's base model chooses it."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    # Mistral and Phi-3 have no layer_types: one sliding window for all layers, when set.
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * int(config.num_hidden_layers)


def causal_masks(config: Any, h: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 kinds: set[str]) -> dict[str, Any]:
    """The 4-D masks (or None where sdpa can use is_causal) the base model would build."""
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    make = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    args = {"config": config, "inputs_embeds": h, "attention_mask": attention_mask, "cache": None,
            "position_ids": position_ids}
    return {kind: make[kind](**args) for kind in kinds}


class LayerDict(nn.ModuleDict):
    """Layers under their original indices; calling it lists them (Tail.layers() protocol)."""

    def __call__(self) -> list[nn.Module]:  # type: ignore[override]
        return list(self.values())


def take_layers(model: nn.Module, first_layer: int, name: str) -> LayerDict:
    return LayerDict(keep_layers(getattr(model, name), first_layer))


class DecoderTail(Tail):
    """Layers k..N-1 + final norm of a rotary decoder base model (LlamaModel and its kin)."""

    hf_prefix = "model"  # LlamaForCausalLM.model, LlamaForSequenceClassification.model ...
    sequence_head = "last"  # *ForSequenceClassification pools the last real token
    adapter_points: ClassVar[tuple[str, str]] = ("self_attn.o_proj", "mlp.down_proj")
    lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "v_proj")
    #: Gemma 3: rotary_emb(h, position_ids, layer_type) (separate local and global RoPE).
    rotary_per_layer_type: ClassVar[bool] = False

    def __init__(self, config: Any, first_layer: int, model: nn.Module):
        super().__init__(config, first_layer)
        if getattr(config, "use_bidirectional_attention", False):
            from erstore.errors import IncompatibleStoreError

            raise IncompatibleStoreError(f"{self.family}: bidirectional-attention configs are not supported")
        # Kept under transformers' name `layers` (parameter names layers.K....), which is also the
        # Tail method's name: LayerDict is a ModuleDict that, called, lists its layers.
        self._modules["layers"] = take_layers(model, first_layer, "layers")
        self.norm = model.norm
        self.rotary_emb = model.rotary_emb
        self.types = layer_types(config)

    @classmethod
    def from_model(cls, model: Any, first_layer: int) -> DecoderTail:
        return cls(model.config, first_layer, model)

    @property
    def layers(self) -> LayerDict:  # type: ignore[override]
        """The kept layers under their indices; `tail.layers()` lists them, as for every Tail."""
        return self._modules["layers"]

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h, am = self.prepare(hidden_states, attention_mask)
        if self.first_layer == self.num_layers:
            return h  # hidden_states[N] is already the normalised output
        if position_ids is None:
            position_ids = positions(am)
        kept = self.layers
        kinds = {self.types[int(i)] for i in kept}
        masks = causal_masks(self.config, h, am, position_ids, kinds)
        if self.rotary_per_layer_type:
            rotary = {kind: self.rotary_emb(h, position_ids, kind) for kind in kinds}
        else:
            shared = self.rotary_emb(h, position_ids)
            rotary = {kind: shared for kind in kinds}
        for i, layer in kept.items():
            kind = self.types[int(i)]
            h = layer(h, attention_mask=masks[kind], position_embeddings=rotary[kind],
                      position_ids=position_ids, cache=None, use_cache=False)
        return self.norm(h)
