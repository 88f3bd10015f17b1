"""Predictions on new text, shared by the reduced model and the full fine-tuning baseline.

A model class implements `window_logits(windows, store=...)` (logits of token windows, computed
its own way: stored/computed layer-k states for `ReducedModel`, the whole model on token ids for
`FullModel`); `Serving` turns those into what users want:

- `predict_words(words, store=...)`: one tag per word (token tasks), from the first sub-token of
  each word, across the windows of long documents (`consumers.decode.word_logits`);
- `predict_answers(questions, contexts, store=...)`: answer text with character offsets (QA);
- `encode(texts, store=...)`: sentence embeddings (embedding head; `consumers.embed.encode`).

Texts are tokenized exactly as the store's build did (`erstore.labels.windower_for`).
Not here: sequence-level prediction (each model's own `predict`), batching across calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .decode import best_answer, word_logits, word_tags


class Serving:
    """Mixin: per-word and answer-text predictions on top of `window_logits`."""

    task: str

    def window_logits(self, windows: list[list[tuple[list[int], int]]], *, store: Any,
                      write_back: bool = False, batch_size: int = 32) -> list[list[np.ndarray]]:
        raise NotImplementedError

    def predict_words(self, texts: Sequence[Sequence[str] | str], *, store: Any,
                      label_names: Sequence[str] | None = None, o_label: int = 0, logits: bool = False,
                      write_back: bool = False, batch_size: int = 32) -> list[Any]:
        """Per text, one tag per word: label ids, or names when `label_names` is given.

        Each text is a list of words (tokenized pre-split, as `erstore build --words-field`
        stores them) or a string (split on whitespace). `logits=True` returns the
        [n_words, num_labels] arrays instead (NaN rows for words without a sub-token).
        """
        from erstore.labels import first_subtokens, windower_for

        if self.task != "token":
            raise ValueError(f"predict_words needs a token-classification head, this model's task is {self.task!r}")
        words = [t.split() if isinstance(t, str) else [str(w) for w in t] for t in texts]
        windower = windower_for(store)
        detailed = windower.detailed_windows(words, split_words=True) if words else []
        per_text = self.window_logits([[(w.ids, w.boundary) for w in ws] for ws in detailed], store=store,
                                      write_back=write_back, batch_size=batch_size)
        out: list[Any] = []
        for ws, lg, wd in zip(detailed, per_text, words):
            values = word_logits(lg, first_subtokens(windower, wd, ws), len(wd))
            if logits:
                out.append(values)
                continue
            tags = word_tags(values, o_label=o_label)
            out.append([label_names[t] for t in tags] if label_names is not None else tags.tolist())
        return out

    def predict_answers(self, questions: Sequence[str], contexts: Sequence[str], *, store: Any,
                        max_answer: int = 30, write_back: bool = False, batch_size: int = 32) -> list[dict[str, Any]]:
        """Per (question, context): {"text", "start", "end", "score"}; `context[start:end] == text`."""
        from erstore.labels import windower_for

        if self.task != "qa":
            raise ValueError(f"predict_answers needs a QA head, this model's task is {self.task!r}")
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        detailed = windower_for(store).detailed_windows(list(questions), list(contexts)) if questions else []
        per_text = self.window_logits([[(w.ids, w.boundary) for w in ws] for ws in detailed], store=store,
                                      write_back=write_back, batch_size=batch_size)
        return [best_answer(lg, ws, c, max_answer=max_answer) for lg, ws, c in zip(per_text, detailed, contexts)]

    def encode(self, texts: Sequence[str] | None = None, *, store: Any, keys: Sequence[str] | None = None,
               windows: str = "first", batch_size: int = 32, write_back: bool = False) -> np.ndarray:
        """Sentence embeddings [n, d] of texts (or stored windows by key); see `consumers.embed.encode`."""
        from .embed import encode

        return encode(self, texts, store=store, keys=keys, windows=windows, batch_size=batch_size,
                      write_back=write_back)
