"""Qwen3 tail: Qwen2's shape plus RMS norms on queries and keys (inside the layers); see
consumers.models.decoder.
"""

from __future__ import annotations

from .decoder import DecoderTail


class Qwen3Tail(DecoderTail):
    family = "qwen3"
