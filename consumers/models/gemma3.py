"""Gemma 3 text tail (model_type gemma3_text): Gemma 2's shape with separate rotary embeddings
for local (sliding) and global layers, computed per layer type; see consumers.models.decoder.
Bidirectional-attention Gemma 3 configs (embedding models) are refused.
"""

from __future__ import annotations

from .decoder import DecoderTail


class Gemma3Tail(DecoderTail):
    family = "gemma3_text"
    rotary_per_layer_type = True
