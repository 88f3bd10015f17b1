"""Phi-3 tail: Llama's shape with fused projections (`qkv_proj`, `gate_up_proj`) and an optional
sliding window for all layers; see consumers.models.decoder.
"""

from __future__ import annotations

from .decoder import DecoderTail


class Phi3Tail(DecoderTail):
    family = "phi3"
    lora_targets = ("qkv_proj",)
