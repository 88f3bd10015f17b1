"""Qwen2 tail: Llama's shape with q/k/v biases and per-layer attention types (`layer_types`:
sliding windows on layers past max_window_layers when use_sliding_window); see
consumers.models.decoder.
"""

from __future__ import annotations

from .decoder import DecoderTail


class Qwen2Tail(DecoderTail):
    family = "qwen2"
