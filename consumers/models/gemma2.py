"""Gemma 2 tail: alternating sliding-window and global layers (`layer_types`), attention logit
soft-capping and query_pre_attn_scalar (inside the layers, eager attention as transformers picks
for it), sandwich norms. The sqrt(hidden_size) embedding scaling precedes layer 0, so stored
states carry it; the final logit soft-capping belongs to the LM head (consumers.heads.LMHead).
See consumers.models.decoder.
"""

from __future__ import annotations

from .decoder import DecoderTail


class Gemma2Tail(DecoderTail):
    family = "gemma2"
