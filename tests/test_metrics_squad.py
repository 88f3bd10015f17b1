"""consumers.metrics.squad_scores equals a maintained port of the official SQuAD scripts.

The reference is torchmetrics' `squad` (ported from the official evaluate-v1.1.py and Hugging
Face's squad metric; installed by the `test` extra). Generated answers mix articles, ASCII and
non-ASCII punctuation, odd whitespace, unicode letters, several gold answers per question and
empty predictions/answers, where the scripts' edge rules live.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import erstore
from consumers.metrics import normalize_answer, squad_f1, squad_scores

squad = pytest.importorskip("torchmetrics.functional.text.squad").squad

WORDS = ["Paris", "paris", "the", "The", "a", "An", "an", "Eiffel", "tower", "1976", "3.5", "U.S.",
         "café", "CAFÉ", "Straße", "İstanbul", "naïve", "北京", "東京", "theatre", "another", "and",
         "it's", "(1976)", "Paris,", "—", "«Paris»", "’s", "!", "...", "-", "a.m.", "x"]
SPACES = [" ", "  ", "\t", "\n", "\u00a0", "\u2003", ""]


@st.composite
def answer(draw) -> str:
    words = draw(st.lists(st.sampled_from(WORDS), max_size=6))
    out = ""
    for w in words:
        out += w + draw(st.sampled_from(SPACES))
    return draw(st.sampled_from(["", " ", "\t"])) + out


@st.composite
def question(draw) -> tuple[str, list[str]]:
    golds = draw(st.lists(answer(), max_size=3))
    if golds and draw(st.booleans()):  # a prediction close to a gold answer: a sub-span of it
        words = golds[0].split()
        a = draw(st.integers(0, len(words)))
        b = draw(st.integers(a, len(words)))
        pred = " ".join(words[a:b])
    else:
        pred = draw(answer())
    return pred, golds


def reference(questions: list[tuple[str, list[str]]]) -> tuple[float, float]:
    """torchmetrics' scores; a question without gold answers is given [""], SQuAD v2's convention."""
    preds = [{"id": str(i), "prediction_text": p} for i, (p, _) in enumerate(questions)]
    target = [{"id": str(i), "answers": {"text": g or [""], "answer_start": [0] * len(g or [""])}}
              for i, (_, g) in enumerate(questions)]
    out = squad(preds, target)
    return float(out["exact_match"]), float(out["f1"])


@settings(max_examples=300, deadline=None)
@given(st.lists(question(), min_size=1, max_size=8))
def test_scores_equal_torchmetrics_squad(questions):
    ours = squad_scores([p for p, _ in questions], [g for _, g in questions])
    ref = reference(questions)
    # torchmetrics sums in float32 tensors: equal up to float32 rounding.
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-4)


@settings(max_examples=300, deadline=None)
@given(question())
def test_each_question_equals_torchmetrics(q):
    pred, golds = q
    assert squad_scores([pred], [golds]) == pytest.approx(reference([q]), rel=1e-5, abs=1e-4)


def test_empty_answer_rules():
    # Unanswerable question (no gold answers): only an empty prediction scores.
    assert squad_scores([""], [[]]) == (100.0, 100.0)
    assert squad_scores(["Paris"], [[]]) == (0.0, 0.0)
    # A prediction that normalises to nothing ("the", punctuation) is an empty answer.
    assert squad_scores(["The!"], [[""]]) == (100.0, 100.0)
    assert squad_f1("a", "Paris") == 0.0 and squad_f1("", "") == 1.0
    assert normalize_answer("«Paris»") == "«paris»"  # only ASCII punctuation goes, as in the script
    assert reference([("The!", [""]), ("Paris", [])]) == (50.0, 50.0)


def test_mismatched_lengths_are_refused():
    with pytest.raises(erstore.InvalidInputError, match="2 predictions for 1 questions"):
        squad_scores(["a", "b"], [["a"]])
    with pytest.raises(erstore.InvalidInputError, match="no questions"):
        squad_scores([], [])
