"""Mistral tail: Llama's shape with one sliding window for every layer (config.sliding_window).

The sliding-window causal mask comes from transformers.masking_utils, as MistralModel builds it;
see consumers.models.decoder.
"""

from __future__ import annotations

from .decoder import DecoderTail


class MistralTail(DecoderTail):
    family = "mistral"
