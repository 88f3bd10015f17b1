"""From per-window logits to what a user asked about: one tag per word, an answer as text.

- `word_logits`: a word's logits are those of its first sub-token (as training labels it). A
  word in two overlapping windows of a long document is read from the window where it has the
  most context on both sides (the window-edge rule of transformers' QA post-processing).
  Words without any sub-token (e.g. a lone control character) get NaN rows.
- `best_answer`: the highest start+end span over a question's windows, limited to context
  tokens and `max_answer` tokens, returned with its character offsets into the context.

Not here: running models (`consumers.serving`), scoring (`consumers.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import best_span


def word_logits(window_logits: Sequence[np.ndarray], word_positions: Sequence[Sequence[int]],
                n_words: int) -> np.ndarray:
    """[n_words, num_labels] logits of each word from its windows (NaN for words in none)."""
    width = window_logits[0].shape[-1] if len(window_logits) else 1
    out = np.full((n_words, width), np.nan, dtype=np.float32)
    best = np.full(n_words, -1, dtype=np.int64)  # context of the window used so far
    for logits, positions in zip(window_logits, word_positions):
        pos = np.asarray(positions, dtype=np.int64)
        here = pos >= 0
        context = np.minimum(pos, len(logits) - 1 - pos)
        take = here & (context > best)
        out[take] = logits[pos[take]]
        best[take] = context[take]
    return out


def word_tags(logits: np.ndarray, *, o_label: int = 0) -> np.ndarray:
    """Argmax per word; words without sub-tokens (NaN rows) get `o_label`."""
    missing = np.isnan(logits).any(-1)
    tags = np.where(missing, o_label, np.nan_to_num(logits, nan=-np.inf).argmax(-1))
    return tags.astype(np.int64)


def best_answer(window_logits: Sequence[np.ndarray], windows: Sequence[Any], context: str, *,
                max_answer: int = 30) -> dict[str, Any]:
    """{"text", "start", "end", "score"}: the best context span over one question's windows.

    `windows` are `erstore.tokenize.Window`s of the (question, context) pair (offsets of context
    tokens point into `context`); `window_logits[i]` is [n_tokens, 2] (start, end)."""
    best: tuple[float, int, int, int] = (-math.inf, 0, 0, -1)
    for i, (logits, w) in enumerate(zip(window_logits, windows)):
        score, a, b = best_span(logits, w.boundary, len(w.ids), max_answer)
        if score > best[0]:
            best = (score, a, b, i)
    score, a, b, i = best
    if i < 0:
        return {"text": "", "start": 0, "end": 0, "score": -math.inf}
    offsets = windows[i].offsets
    start, end = int(offsets[a][0]), int(offsets[b][1])
    return {"text": context[start:end], "start": start, "end": end, "score": score}
