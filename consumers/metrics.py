"""Task metrics in points (0-100), computed over the user's rows as the standard scripts do.

- `accuracy`: per labelled row (document/text), the logits of its windows averaged (as
  `ReducedModel.predict` does);
- `entity_f1`: span-level micro F1 over BIO/IOB2 entities, computed by `seqeval` (the
  CoNLL-style score transformers' NER examples report), over per-word tags;
- `word_f1`: micro F1 over words whose gold or predicted tag is not the O tag (used only when
  tags are bare integers without names, so entity spans cannot be read off them);
- `squad_scores`: exact match and F1 as the official SQuAD evaluation scripts compute them
  (normalised answer text: lower case, no punctuation or articles; token F1; max over the gold
  answers), with the SQuAD v2 rule for empty answers: a question without gold answers is
  unanswerable (gold ""), and when the prediction or a gold answer normalises to nothing, F1 is 1
  if both do and 0 otherwise (v1.1's script gave F1 0 with exact match 1 there). This is
  torchmetrics' `squad` (and Hugging Face's squad_v2 rule); tests/test_metrics_squad.py checks
  equality with torchmetrics on generated answers.
- `token_f1`, `span_scores`: the older sub-token level scores, kept for callers of 0.x.

Not here: SQuAD v2's no-answer probability threshold (HasAns/NoAns splits), seqeval's strict mode, or per-entity-type reports.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np


def accuracy(logits: list[np.ndarray], groups: list[tuple[list[int], int]]) -> float:
    hits = [int(np.mean([logits[i] for i in idx], axis=0).argmax() == gold) for idx, gold in groups]
    return 100.0 * float(np.mean(hits))


def entity_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """seqeval's (span-level, micro) F1 of per-word BIO tags, in points."""
    try:
        from seqeval.metrics import f1_score
    except ImportError as e:
        from erstore.errors import InvalidInputError

        raise InvalidInputError("entity F1 needs seqeval: pip install 'erstore[consumers]'") from e
    return 100.0 * float(f1_score([list(g) for g in gold], [list(p) for p in pred]))


def word_f1(gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], *, o_label: int = 0) -> float:
    """Micro F1 over words, counting a tag as positive when it is not `o_label`."""
    tp = pred_pos = gold_pos = 0
    for g, p in zip(gold, pred):
        g, p = np.asarray(g), np.asarray(p)
        tp += int(((p == g) & (g != o_label)).sum())
        pred_pos += int((p != o_label).sum())
        gold_pos += int((g != o_label).sum())
    return 200.0 * tp / (pred_pos + gold_pos) if pred_pos + gold_pos else 100.0


# -- SQuAD (the official evaluate-v1.1.py normalisation and token F1, v2's empty-answer rule) -------
_PUNCTUATION = frozenset(string.punctuation)  # ASCII only, as the official script


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, ground_truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    if not pred or not gold:  # no answer (SQuAD v2): right only if both are empty
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> tuple[float, float]:
    """(exact match, F1) in points: per question the best over its gold answers, then the mean.

    A question with no gold answers is unanswerable: only an empty prediction scores on it.

    Raises:
        InvalidInputError: no questions, or not one prediction per question.
    """
    if len(predictions) != len(answers) or not answers:
        from erstore.errors import InvalidInputError

        raise InvalidInputError(
            f"squad_scores needs one prediction per question, got {len(predictions)} predictions for "
            f"{len(answers)} questions" + ("" if answers else " (no questions to score)")
        )
    em, f1 = [], []
    for p, golds in zip(predictions, answers):
        golds = list(golds) or [""]
        em.append(max(float(normalize_answer(p) == normalize_answer(a)) for a in golds))
        f1.append(max(squad_f1(p, a) for a in golds))
    return 100.0 * float(np.mean(em)), 100.0 * float(np.mean(f1))


# -- sub-token level (0.x) --------------------------------------------------------------------
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
