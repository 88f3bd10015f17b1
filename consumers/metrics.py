"""Task metrics in points (0-100) over per-window logits, as the layer-choice report uses them.

- `accuracy`: per labelled document/text, the logits of its windows averaged (as
  `ReducedModel.predict` does);
- `token_f1`: micro F1 over labelled tokens whose gold or predicted tag is not the O tag (token
  level, not seqeval's entity level);
- `span_scores`: SQuAD-style bag-of-sub-tokens F1 and exact match of the best span over a
  question's windows.

Not here: entity-level NER scoring, text-normalised (word-level) SQuAD scoring.
"""

from __future__ import annotations

import math

import numpy as np


def accuracy(logits: list[np.ndarray], groups: list[tuple[list[int], int]]) -> float:
    hits = [int(np.mean([logits[i] for i in idx], axis=0).argmax() == gold) for idx, gold in groups]
    return 100.0 * float(np.mean(hits))


def token_f1(logits: list[np.ndarray], gold: list[np.ndarray], *, o_label: int = 0) -> float:
    """Micro F1 over labelled tokens, counting a tag as positive when it is not `o_label`."""
    tp = pred_pos = gold_pos = 0
    for lg, g in zip(logits, gold):
        g = np.asarray(g)
        m = g != -100
        p, g = lg[: len(g)].argmax(-1)[m], g[m]
        tp += int(((p == g) & (g != o_label)).sum())
        pred_pos += int((p != o_label).sum())
        gold_pos += int((g != o_label).sum())
    return 200.0 * tp / (pred_pos + gold_pos) if pred_pos + gold_pos else 100.0


def best_span(logits: np.ndarray, boundary: int, length: int, max_answer: int = 30) -> tuple[float, int, int]:
    """(score, start, end) of the best context span of one window (context: boundary..length-2)."""
    lo, hi = max(boundary, 1), length - 1
    s, e = logits[lo:hi, 0], logits[lo:hi, 1]
    if len(s) == 0:
        return -math.inf, 0, 0
    score = s[:, None] + e[None, :]
    n = len(s)
    valid = np.triu(np.ones((n, n), bool)) & ~np.triu(np.ones((n, n), bool), max_answer)
    score = np.where(valid, score, -np.inf)
    a, b = np.unravel_index(int(score.argmax()), score.shape)
    return float(score[a, b]), lo + int(a), lo + int(b)


def span_scores(logits: list[np.ndarray], groups: list, keys: list[str],
                tokens: dict[str, tuple[np.ndarray, int]]) -> tuple[float, float]:
    """(span F1, exact match) over questions, comparing sub-token ids."""
    f1s, ems = [], []
    for idx, gold in groups:
        spans = [(best_span(logits[i], tokens[keys[i]][1], len(tokens[keys[i]][0])), i) for i in idx]
        (_, a, b), i = max(spans, key=lambda t: t[0][0])
        pred = tokens[keys[i]][0][a: b + 1]
        common = sum(min(np.sum(pred == t), np.sum(gold == t)) for t in set(pred.tolist()))
        f1s.append(0.0 if common == 0 else 2 * common / (len(pred) + len(gold)))
        ems.append(float(len(pred) == len(gold) and bool(np.all(pred == gold))))
    return 100.0 * float(np.mean(f1s)), 100.0 * float(np.mean(ems))
