"""Llama tail (Llama 2/3 and every LlamaModel checkpoint): see consumers.models.decoder.

A whole family in a few lines: a user family registered with `consumers.register_family` can be
just this (a DecoderTail subclass naming its LoRA targets), if its base model has transformers'
Llama shape (`layers`, `norm`, `rotary_emb`).
"""

from __future__ import annotations

from .decoder import DecoderTail


class LlamaTail(DecoderTail):
    family = "llama"
    lora_targets = ("q_proj", "v_proj")
