"""kvcli.eval.metrics: each metric's definition, and every metric stays in [0, 1]."""

from __future__ import annotations

import pytest

from kvcli.errors import InputError
from kvcli.eval.metrics import METRICS, choice, contains, get_metric, qa_f1, rouge_l


def test_contains_is_case_insensitive_over_answers():
    """contains is 1 when any answer appears in the prediction, ignoring case."""
    assert contains("It was SMOKED Paprika, I think.", ["saffron", "smoked paprika"]) == 1.0
    assert contains("saffron", ["smoked paprika"]) == 0.0


def test_qa_f1_normalizes_and_takes_the_best_answer():
    """qa_f1 ignores case, punctuation and articles, and scores against the best answer."""
    assert qa_f1("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert qa_f1("eiffel tower in paris", ["Eiffel Tower"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert qa_f1("london", ["paris", "London."]) == 1.0
    assert qa_f1("nothing shared", ["paris"]) == 0.0
    assert qa_f1("", ["paris"]) == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    """rouge_l is the F1 of the LCS over normalized whitespace tokens."""
    # LCS of "cat sat on mat" and "cat was on mat" is "cat on mat": P = R = 3/4.
    assert rouge_l("The cat sat on the mat.", ["a cat was on a mat"]) == pytest.approx(0.75)
    assert rouge_l("x y z", ["z y x"]) == pytest.approx(1 / 3)
    assert rouge_l("same words here", ["no", "Same words, here!"]) == 1.0
    assert rouge_l("", ["anything"]) == 0.0


def test_choice_reads_the_first_standalone_letter():
    """choice takes the first standalone A-D in the prediction, not the A of 'Answer'."""
    assert choice("Answer: (B) because...", ["B"]) == 1.0
    assert choice("C. The third option, not A", ["C"]) == 1.0
    assert choice("A or B", ["B"]) == 0.0
    assert choice("I cannot tell", ["A"]) == 0.0
    assert choice("d", ["D"]) == 0.0  # lowercase letters are words, not choices


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_is_in_unit_interval(name):
    """Every metric returns a float in [0, 1] for matching, partial and empty predictions."""
    for prediction in ("A paris", "the answer is B, paris, france", ""):
        value = METRICS[name](prediction, ["Paris", "B"])
        assert isinstance(value, float) and 0.0 <= value <= 1.0


def test_unknown_metric_names_the_choices():
    """get_metric returns the named metric and refuses an unknown name with the list of choices."""
    assert get_metric("rouge_l") is rouge_l
    with pytest.raises(InputError, match="unknown metric 'bleu'; choose one of: contains, qa_f1, rouge_l, choice"):
        get_metric("bleu")
