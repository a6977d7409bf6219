"""SQuAD-style answer metrics for short generated answers.

Generated answers are first cut to their first non-empty line (:func:`first_line`)
and stripped of a trailing period, then compared with the gold answers after
SQuAD normalisation (:func:`normalize_answer`). Every metric takes the maximum
over the gold aliases of one question.

Example:
    >>> exact_match("The Eiffel Tower.\\nQuestion: ...", ["Eiffel Tower"])
    1.0
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = [
    "Scores",
    "answer_key",
    "bootstrap_interval",
    "top_answer_share",
    "contains_answer",
    "exact_match",
    "first_line",
    "normalize_answer",
    "score_predictions",
    "token_f1",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Normalises an answer the way the SQuAD evaluation script does.

    Lowercases, removes ASCII punctuation, removes the articles "a", "an" and
    "the", and collapses runs of whitespace into single spaces.

    Args:
        s: Raw answer text.

    Returns:
        The normalised text (possibly empty).
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def first_line(text: str) -> str:
    """Returns the first line of generated text, stripped.

    Leading whitespace (including leading newlines, which small models often
    emit before the answer) is skipped first, so the result is the first
    non-empty line. No model-specific end markers are removed.

    Args:
        text: Generated text.

    Returns:
        The text up to the first newline, with surrounding whitespace removed.
    """
    return text.lstrip().split("\n", 1)[0].strip()


def _prepare(prediction: str) -> str:
    """Cuts a prediction to its first line and drops one trailing period."""
    line = first_line(prediction)
    if line.endswith("."):
        line = line[:-1].rstrip()
    return line


def answer_key(prediction: str) -> str:
    """The answer a prediction gives, as scored: its first line without one trailing period,
    normalised (:func:`normalize_answer`)."""
    return normalize_answer(_prepare(prediction))


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a single string")
    if len(answers) == 0:
        raise ValueError("answers must contain at least one gold answer")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """Exact match of a prediction against any gold answer.

    Args:
        prediction: Generated text; only its first line counts.
        answers: Gold answer and its aliases (non-empty).

    Returns:
        1.0 if the normalised prediction equals any normalised answer, else 0.0.

    Raises:
        ValueError: If ``answers`` is empty.
    """
    _check_answers(answers)
    pred = answer_key(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1_single(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 between a prediction and the best-matching gold answer.

    Tokens are the whitespace-separated words of the normalised texts, counted
    as multisets. If either side normalises to nothing, F1 is 1.0 when both do
    and 0.0 otherwise.

    Args:
        prediction: Generated text; only its first line counts.
        answers: Gold answer and its aliases (non-empty).

    Returns:
        The maximum F1 over ``answers``, in [0, 1].

    Raises:
        ValueError: If ``answers`` is empty.
    """
    _check_answers(answers)
    pred_tokens = answer_key(prediction).split()
    return max(_f1_single(pred_tokens, normalize_answer(a).split()) for a in answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """Whether any gold answer occurs as whole words inside the prediction.

    Both sides are normalised; only the prediction's first line is searched,
    so answers that a model rambles into on later lines do not count. An
    answer that normalises to the empty string never matches.

    Args:
        prediction: Generated text; only its first line counts.
        answers: Gold answer and its aliases (non-empty).

    Returns:
        1.0 if some normalised answer is a whole-word substring of the
        normalised prediction, else 0.0.

    Raises:
        ValueError: If ``answers`` is empty.
    """
    _check_answers(answers)
    padded = f" {answer_key(prediction)} "
    for answer in answers:
        gold = normalize_answer(answer)
        if gold and f" {gold} " in padded:
            return 1.0
    return 0.0


@dataclass
class Scores:
    """Mean metrics over a set of predictions.

    Attributes:
        exact_match: Mean exact match in [0, 1].
        f1: Mean token F1 in [0, 1].
        contains: Mean whole-word containment in [0, 1].
        n: Number of scored predictions.
    """

    exact_match: float
    f1: float
    contains: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """Returns the scores as a plain dict (JSON-serialisable)."""
        return asdict(self)


def score_predictions(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> Scores:
    """Scores predictions against gold answers and averages the metrics.

    Args:
        predictions: One generated text per question.
        answers: One non-empty list of gold answers per question.

    Returns:
        The mean exact match, F1 and containment; all zero when there are no
        predictions.

    Raises:
        ValueError: If the two sequences differ in length or an answer list is
            empty.
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(answers)} answer lists"
        )
    n = len(predictions)
    if n == 0:
        return Scores(exact_match=0.0, f1=0.0, contains=0.0, n=0)
    em = f1 = contains = 0.0
    for prediction, gold in zip(predictions, answers):
        em += exact_match(prediction, gold)
        f1 += token_f1(prediction, gold)
        contains += contains_answer(prediction, gold)
    return Scores(exact_match=em / n, f1=f1 / n, contains=contains / n, n=n)


def bootstrap_interval(values: Sequence[float], *, resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-question values.

    Args:
        values: One metric value per question.
        resamples: Bootstrap resamples (seeded, so the interval is reproducible).
        level: Coverage, e.g. 0.95.
        seed: Resampling seed.

    Returns:
        (low, high); (0.0, 0.0) for no values.
    """
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def top_answer_share(predictions: Sequence[str]) -> tuple[str, float]:
    """The most frequent normalised answer (first line) and the share of predictions that
    give it: a collapse detector (a model answering "yes" to everything shows 1.0)."""
    if not predictions:
        return "", 0.0
    counts = Counter(answer_key(p) for p in predictions)
    answer, count = max(counts.items(), key=lambda item: (item[1], item[0]))
    return answer, count / len(predictions)
