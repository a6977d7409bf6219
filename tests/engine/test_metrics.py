"""Tests for regrad_engine.metrics."""

from __future__ import annotations

import pytest

from regrad_engine.metrics import (
    Scores,
    contains_answer,
    exact_match,
    first_line,
    normalize_answer,
    score_predictions,
    token_f1,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a   Violin.  ", "violin"),
        ("An apple, the pear", "apple pear"),
        ("Theatre", "theatre"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_first_line() -> None:
    assert first_line("  Paris \nQuestion: where?") == "Paris"
    assert first_line("\n\n Lisbon.\nmore") == "Lisbon."
    assert first_line("") == ""


def test_exact_match_aliases_and_first_line() -> None:
    assert exact_match("soccer", ["football", "soccer"]) == 1.0
    assert exact_match("The violin.", ["violin"]) == 1.0
    assert exact_match("Paris\nTokyo", ["Tokyo"]) == 0.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0


def test_token_f1_partial_overlap() -> None:
    # pred tokens: [born, in, lisbon, portugal] (4), gold: [lisbon, portugal, city]
    # overlap 2 -> precision 2/4, recall 2/3 -> F1 = 2 * .5 * .6667 / 1.1667 = 4/7
    f1 = token_f1("born in Lisbon, Portugal.", ["the city Lisbon Portugal"])
    assert f1 == pytest.approx(4 / 7)
    assert token_f1("Lisbon", ["Paris", "Lisbon"]) == 1.0
    assert token_f1("Rome", ["Paris"]) == 0.0


def test_empty_prediction() -> None:
    assert exact_match("", ["Paris"]) == 0.0
    assert token_f1("", ["Paris"]) == 0.0
    assert contains_answer("", ["Paris"]) == 0.0
    assert token_f1("The.", ["a"]) == 1.0  # both normalise to nothing


def test_contains_answer_whole_word() -> None:
    assert contains_answer("She was born in Lisbon in 1962.", ["lisbon"]) == 1.0
    assert contains_answer("Parisian food", ["Paris"]) == 0.0
    assert contains_answer("plays table tennis", ["table tennis"]) == 1.0
    assert contains_answer("nothing\nParis", ["Paris"]) == 0.0


def test_empty_answers_rejected() -> None:
    with pytest.raises(ValueError):
        exact_match("Paris", [])


def test_score_predictions_means() -> None:
    scores = score_predictions(
        ["Paris", "born in Lisbon", "Rome"], [["Paris"], ["Lisbon"], ["Oslo"]]
    )
    assert isinstance(scores, Scores)
    assert scores.n == 3
    assert scores.exact_match == pytest.approx(1 / 3)
    assert scores.f1 == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores.contains == pytest.approx(2 / 3)
    assert scores.as_dict() == {
        "exact_match": scores.exact_match, "f1": scores.f1,
        "contains": scores.contains, "n": 3,
    }
    assert score_predictions([], []).n == 0
    with pytest.raises(ValueError):
        score_predictions(["a"], [])
