"""GSM answer extraction: references, strict and flexible model outputs, the comparison
(METHODS.md 9.4)."""

from __future__ import annotations

import pytest

from distill_jax.data import answers


@pytest.mark.parametrize(
    "text,want",
    [
        ("so the total is 34.\n#### 1,234", 1234.0),
        ("#### $18.00.", 18.0),
        ("#### -3.5", -3.5),
        ("42", 42.0),
    ],
)
def test_reference_extraction(text, want):
    assert answers.extract_reference(text) == want


@pytest.mark.parametrize(
    "text,mode,want",
    [
        ("He pays 3 * 6 = 18 dollars, so $18.00.", "flexible", 18.0),
        ("The answer is 1,234.", "strict", 1234.0),
        ("blah #### -7", "strict", -7.0),
        ("so 5 apples and 7 pears", "strict", None),
        ("so 5 apples and 7 pears", "flexible", 7.0),
        (r"thus \boxed{0.25} in all, 3 left", "flexible", 0.25),
        ("no number here", "flexible", None),
    ],
)
def test_answer_extraction(text, mode, want):
    assert answers.extract_answer(text, mode) == want


def test_is_correct_compares_numbers():
    assert answers.is_correct(18.0, answers.extract_reference("#### 18"))
    assert not answers.is_correct(None, 18.0)
    assert not answers.is_correct(18.01, 18.0)
