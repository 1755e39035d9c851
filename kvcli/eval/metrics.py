"""Answer metrics: each scores a prediction against a row's answers, in [0, 1], the best answer counting."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from ..errors import InputError


def normalize_answer(text: str) -> str:
    """LongBench's normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def contains(prediction: str, answers: Sequence[str]) -> float:
    """1 if any answer appears in the prediction (case-insensitive), else 0."""
    lowered = prediction.lower()
    return float(any(answer.lower() in lowered for answer in answers if answer))


def _f1(overlap: int, n_pred: int, n_gold: int) -> float:
    """The harmonic mean of precision (overlap / n_pred) and recall (overlap / n_gold)."""
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_gold
    return 2 * precision * recall / (precision + recall)


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    return _f1(sum((Counter(pred) & Counter(gold)).values()), len(pred), len(gold))


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """LongBench's token F1 between the normalized prediction and the best answer."""
    return max((_token_f1(prediction, answer) for answer in answers), default=0.0)


def _lcs_len(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def _rouge_l(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    return _f1(_lcs_len(pred, gold) if pred and gold else 0, len(pred), len(gold))


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L F1 over whitespace tokens after normalization, against the best answer."""
    return max((_rouge_l(prediction, answer) for answer in answers), default=0.0)


_LETTER = re.compile(r"\b([ABCD])\b")


def _first_letter(text: str) -> str | None:
    # A standalone capital (as in "B", "(B)", "B." or "answer: B"), so "Answer" is not an A.
    match = _LETTER.search(text)
    return match.group(1) if match else None


def choice(prediction: str, answers: Sequence[str]) -> float:
    """1 if the first standalone A/B/C/D in the prediction is the answer letter, else 0."""
    letter = _first_letter(prediction)
    return float(letter is not None and any(letter == (_first_letter(a.strip().upper()) or a.strip()) for a in answers))


Metric = Callable[[str, Sequence[str]], float]
METRICS: dict[str, Metric] = {"contains": contains, "qa_f1": qa_f1, "rouge_l": rouge_l, "choice": choice}


def get_metric(name: str) -> Metric:
    """The metric called `name`; an InputError listing the choices for an unknown one."""
    if name not in METRICS:
        raise InputError(f"unknown metric {name!r}; choose one of: {', '.join(METRICS)}")
    return METRICS[name]
